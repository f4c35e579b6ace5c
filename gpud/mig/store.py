"""What gpud remembers about MIG across crashes and reboots, under ``<state_dir>/mig/``.

``selected.json`` is the layout the operator chose (the config text itself, so a boot does not
depend on the file still being where it was): MIG instances do not survive a reboot or a driver
reload, and gpud recreates them from it at start. An apply in progress is recorded in two files:
``journal.json`` (the target and the plan, written once when the apply starts) and
``progress.json`` (how far it got, rewritten before every mutation, small so that the cost of a
step does not grow with the plan). Both carry the apply's ID; a progress record of another
apply means this one has not got anywhere yet. Finding it unfinished at start means gpud died
mid-apply, and the apply is completed (re-planned from what the GPUs actually hold) before
anything is advertised to kubelet.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpud.atomic import write_atomic

STORE_VERSION = 1

Status = Literal["running", "done", "failed"]


class StoreCorrupt(Exception):
    """A state file is unreadable; gpud refuses to guess what the GPUs should hold."""


@dataclass(frozen=True)
class Selection:
    name: str
    # The mig-parted config text the layout was chosen from, and where it came from.
    text: str
    source: str
    # Who chose it (gpud.node.requests.ORIGIN_*): `gpudctl mig show` names it. "" in records
    # written before gpud kept it.
    origin: str = ""


@dataclass(frozen=True)
class Journal:
    selection: Selection
    status: Status
    # The steps of the plan as dicts (for the record and for `gpudctl mig show`).
    steps: tuple[dict[str, Any], ...] = ()
    # Index of the step about to run; written before it runs.
    next_step: int = 0
    mutations: int = 0
    error: str = ""
    # Physical GPUs whose devices were withdrawn from kubelet for this apply.
    withdrawn: tuple[str, ...] = field(default=())


class MigStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "mig"
        self.selected_path = self.dir / "selected.json"
        self.journal_path = self.dir / "journal.json"
        self.progress_path = self.dir / "progress.json"
        # The plan objects last written to journal.json, and that apply's ID.
        self._written: tuple[object, object, object] | None = None
        self._apply_id = ""

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreCorrupt(f"{path} is not valid JSON ({exc}); move it away") from None
        if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
            raise StoreCorrupt(f"{path} has an unknown format; move it away")
        return data

    def _write(self, path: Path, body: dict[str, Any]) -> None:
        write_atomic(path, json.dumps({"version": STORE_VERSION, **body}).encode())

    def selection(self) -> Selection | None:
        data = self._read(self.selected_path)
        if data is None:
            return None
        try:
            return Selection(**data["selection"])
        except (KeyError, TypeError) as exc:
            raise StoreCorrupt(f"{self.selected_path}: {exc}; move it away") from None

    def select(self, selection: Selection) -> None:
        """Remember ``selection``; nothing is written when it is already the one on disk."""
        try:
            if self.selection() == selection:
                return
        except StoreCorrupt:
            pass  # replaced by a good one
        self._write(self.selected_path, {"selection": asdict(selection)})

    def journal(self) -> Journal | None:
        data = self._read(self.journal_path)
        if data is None:
            return None
        progress = self._read(self.progress_path) or {}
        try:
            body = data["journal"]
            done = progress.get("progress", {})
            if done.get("apply") != body["apply"]:
                done = {"status": "running", "next_step": 0, "mutations": 0, "error": ""}
            return Journal(
                selection=Selection(**body["selection"]),
                status=done["status"],
                steps=tuple(body["steps"]),
                next_step=done["next_step"],
                mutations=done["mutations"],
                error=done["error"],
                withdrawn=tuple(body["withdrawn"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupt(f"{self.journal_path}: {exc}; move it away") from None

    def record(self, journal: Journal) -> None:
        """Write how far ``journal`` got; its target and plan only when they are new."""
        plan = (journal.selection, journal.steps, journal.withdrawn)
        if self._written is None or any(
            a is not b for a, b in zip(plan, self._written, strict=True)
        ):
            self._apply_id = secrets.token_hex(8)
            body = {
                "apply": self._apply_id,
                "selection": asdict(journal.selection),
                "steps": list(journal.steps),
                "withdrawn": list(journal.withdrawn),
            }
            self._write(self.journal_path, {"journal": body})
            self._written = plan
        progress = {
            "apply": self._apply_id,
            "status": journal.status,
            "next_step": journal.next_step,
            "mutations": journal.mutations,
            "error": journal.error,
        }
        self._write(self.progress_path, {"progress": progress})
