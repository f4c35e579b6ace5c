"""The claims gpud prepared, kept in its state directory across restarts and kill -9.

kubelet sends Unprepare with nothing but the claim's namespace, name and UID, possibly after gpud
restarted and after the claim object is gone from the API server. The checkpoint is what still
says which devices and CDI IDs that claim got, so a repeated Prepare answers exactly as before and
Unprepare knows what to release. It is written atomically (temporary file, fsync, rename) after
the claim's CDI spec exists and before Prepare answers; a checksum over the claims catches a
file damaged outside gpud, which is then set aside rather than trusted or crashed on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.atomic import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "dra-checkpoint.json"
VERSION = 1


class CheckpointCorrupt(Exception):
    """The file exists but cannot be trusted; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    request_names: tuple[str, ...]
    pool: str
    device: str
    cdi_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    devices: tuple[PreparedDevice, ...]


def encode(claims: Mapping[str, PreparedClaim]) -> bytes:
    body = {
        uid: {
            "namespace": c.namespace,
            "name": c.name,
            "devices": [
                {
                    "requestNames": list(d.request_names),
                    "pool": d.pool,
                    "device": d.device,
                    "cdiDeviceIDs": list(d.cdi_ids),
                }
                for d in c.devices
            ],
        }
        for uid, c in sorted(claims.items())
    }
    doc = {"version": VERSION, "checksum": _checksum(body), "preparedClaims": body}
    return json.dumps(doc, indent=1).encode()


def decode(data: bytes) -> dict[str, PreparedClaim]:
    """The claims of a checkpoint file's bytes; CheckpointCorrupt when it cannot be trusted."""
    try:
        doc = json.loads(data)
        if doc.get("version") != VERSION:
            raise CheckpointCorrupt(f"unknown checkpoint version {doc.get('version')!r}")
        body = doc["preparedClaims"]
        if doc.get("checksum") != _checksum(body):
            raise CheckpointCorrupt("checksum mismatch")
        return {
            uid: PreparedClaim(
                uid,
                str(c["namespace"]),
                str(c["name"]),
                tuple(
                    PreparedDevice(
                        tuple(map(str, d["requestNames"])),
                        str(d["pool"]),
                        str(d["device"]),
                        tuple(map(str, d["cdiDeviceIDs"])),
                    )
                    for d in c["devices"]
                ),
            )
            for uid, c in body.items()
        }
    except CheckpointCorrupt:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointCorrupt(f"not a checkpoint: {type(exc).__name__}: {exc}") from None


def _checksum(body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class Checkpoint:
    """The file and its in-memory copy; only the plugin's serialised calls change it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.claims: dict[str, PreparedClaim] = {}

    def load(self) -> str:
        """Read the file; "" when fine or absent, else what was wrong (the file is then moved
        aside to ``<name>.corrupt-<time>`` and gpud starts with no claims prepared: kubelet
        prepares again what it still needs, and Unprepare removes CDI specs by claim UID)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ""
        except OSError as exc:
            return f"cannot read {self.path}: {exc}"
        try:
            self.claims = decode(data)
        except CheckpointCorrupt as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            problem = f"{self.path}: {exc}; moved to {aside}"
            log.error("DRA checkpoint not used: %s", problem)
            return problem
        return ""

    def save(self) -> None:
        write_atomic(self.path, encode(self.claims), mode=0o600)
