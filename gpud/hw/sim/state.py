"""What a simulated GPU remembers across a daemon restart, and how it is kept on disk.

A real GPU keeps its UUID forever, its MIG mode until changed and its lost state until a reboot;
kubelet and running pods know devices by UUID. So the simulation keeps these in a versioned JSON
file and never regenerates them on its own: a file it cannot read is reported, not replaced.
Encoding and decoding are pure; :func:`write_atomic` is the only effect.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from gpud.hw.sim.machines import MachineSpec
from gpud.hw.types import MIG_UNSUPPORTED, MigMode, MigState

STATE_VERSION = 1

GPU_UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""NVIDIA's GPU UUID form, as NVML prints it."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class GpuState:
    """What changes on one simulated GPU and must outlive a restart; MIG instances go here next."""

    uuid: str
    mig: MigState
    lost: bool = False


def state_file(state_dir: Path, spec: str) -> Path:
    """One file per machine spec, so switching ``simulate:`` never reuses another machine's UUIDs.

    Canonical specs hold no ``_``, so replacing their one unsafe character (the ``:`` of
    ``MODEL:COUNT``) by it never makes two of them share a file.
    """
    return state_dir / "sim" / f"{_UNSAFE.sub('_', spec)}.json"


def new_gpu_uuid() -> str:
    digits = os.urandom(16).hex()
    return f"GPU-{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def initial_state(machine: MachineSpec) -> tuple[GpuState, ...]:
    """A machine as first powered on: fresh UUIDs, MIG off where the board has it, nothing lost."""
    off = MigState(MigMode.DISABLED, MigMode.DISABLED)
    return tuple(
        GpuState(new_gpu_uuid(), off if slot.model.mig_capable else MIG_UNSUPPORTED)
        for slot in machine.gpus
    )


def encode(machine: MachineSpec, gpus: tuple[GpuState, ...]) -> bytes:
    document = {
        "version": STATE_VERSION,
        "spec": machine.spec,
        "gpus": [
            {
                "uuid": gpu.uuid,
                "mig_mode": {"current": gpu.mig.current.value, "pending": gpu.mig.pending.value},
                "lost": gpu.lost,
            }
            for gpu in gpus
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def decode(machine: MachineSpec, data: bytes) -> tuple[GpuState, ...]:
    """The state in ``data``, checked against ``machine``; ValueError says what does not fit."""
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("the file does not hold a JSON object")
    version = document.get("version")
    if version != STATE_VERSION or isinstance(version, bool):
        raise ValueError(f"state version {version!r} is not supported (expected {STATE_VERSION})")
    if document.get("spec") != machine.spec:
        raise ValueError(f"it describes machine {document.get('spec')!r}, not {machine.spec!r}")
    entries = document.get("gpus")
    if not isinstance(entries, list) or len(entries) != len(machine.gpus):
        raise ValueError(f"it does not list the {len(machine.gpus)} GPUs of {machine.spec}")
    gpus = tuple(
        _decode_gpu(index, entry, slot.model.mig_capable)
        for index, (entry, slot) in enumerate(zip(entries, machine.gpus, strict=True))
    )
    if len({gpu.uuid for gpu in gpus}) != len(gpus):
        raise ValueError("two GPUs share a UUID")
    return gpus


def _decode_gpu(index: int, entry: object, mig_capable: bool) -> GpuState:
    if not isinstance(entry, dict):
        raise ValueError(f"GPU {index} is not a JSON object")
    uuid = entry.get("uuid")
    if not isinstance(uuid, str) or not GPU_UUID.fullmatch(uuid):
        raise ValueError(f"GPU {index} has no UUID of the form GPU-xxxxxxxx-xxxx-...: {uuid!r}")
    lost = entry.get("lost")
    if not isinstance(lost, bool):
        raise ValueError(f"GPU {index}: 'lost' must be true or false, got {lost!r}")
    mig_mode = entry.get("mig_mode")
    modes = {mode.value: mode for mode in MigMode}
    current = pending = None
    if isinstance(mig_mode, dict):
        current = modes.get(str(mig_mode.get("current")))
        pending = modes.get(str(mig_mode.get("pending")))
    if current is None or pending is None:
        raise ValueError(f"GPU {index} has an unreadable MIG mode: {mig_mode!r}")
    mig = MigState(current, pending)
    fits = MigMode.UNSUPPORTED not in (current, pending) if mig_capable else mig == MIG_UNSUPPORTED
    if not fits:
        raise ValueError(f"GPU {index}: MIG mode {mig.describe()} does not fit this board")
    return GpuState(uuid, mig, lost)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename, fsync the directory (and its parent when the
    directory is new, so the directory itself survives a power cut).
    """
    directory = path.parent
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        _fsync_dir(directory.parent)
    temp = directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
