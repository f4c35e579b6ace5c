"""What gpud remembers about MIG across crashes and reboots, under ``<state_dir>/mig/``.

``selected.json`` is the layout the operator chose (the config text itself, so a boot does not
depend on the file still being where it was): MIG instances do not survive a reboot or a driver
reload, and gpud recreates them from it at start. ``journal.json`` records an apply in progress,
rewritten before every mutation; finding it unfinished at start means gpud died mid-apply, and
the apply is completed (re-planned from what the GPUs actually hold) before anything is
advertised to kubelet.
"""

from __future__ import annotations

import json
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
        write_atomic(path, json.dumps({"version": STORE_VERSION, **body}, indent=1).encode())

    def selection(self) -> Selection | None:
        data = self._read(self.selected_path)
        if data is None:
            return None
        try:
            return Selection(**data["selection"])
        except (KeyError, TypeError) as exc:
            raise StoreCorrupt(f"{self.selected_path}: {exc}; move it away") from None

    def select(self, selection: Selection) -> None:
        self._write(self.selected_path, {"selection": asdict(selection)})

    def journal(self) -> Journal | None:
        data = self._read(self.journal_path)
        if data is None:
            return None
        try:
            body = data["journal"]
            return Journal(
                selection=Selection(**body["selection"]),
                status=body["status"],
                steps=tuple(body["steps"]),
                next_step=body["next_step"],
                mutations=body["mutations"],
                error=body["error"],
                withdrawn=tuple(body["withdrawn"]),
            )
        except (KeyError, TypeError) as exc:
            raise StoreCorrupt(f"{self.journal_path}: {exc}; move it away") from None

    def record(self, journal: Journal) -> None:
        self._write(self.journal_path, {"journal": asdict(journal)})
