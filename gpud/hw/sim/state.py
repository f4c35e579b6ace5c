"""What a simulated GPU remembers across a daemon restart, and how it is kept on disk.

A real GPU keeps its UUID forever, its MIG mode until changed and its lost state until a reboot;
kubelet and running pods know devices by UUID. So the simulation keeps these in a versioned JSON
file and never regenerates them on its own: a file it cannot read is reported, not replaced.
Encoding and decoding are pure; the backend writes the file with :func:`gpud.atomic.write_atomic`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from gpud.hw.sim import mig
from gpud.hw.sim.machines import MachineSpec
from gpud.hw.sim.telemetry import AUTOMATIC, BOARDS, Checkpoint, GpuLoad, Load, load_problems, parts
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    ComputeInstance,
    GpuInstance,
    GpuProcess,
    MigMode,
    MigState,
    Placement,
)
from gpud.mig.catalog import Family, family_for

STATE_VERSION = 3
"""Version 2 added MIG instances and persisted faults, version 3 each GPU's load and telemetry
checkpoint. An older file is read as having none of what came later and is rewritten as the
current version by the next change: refusing it would make the operator move it away, and with it
every GPU's UUID."""

_READABLE_VERSIONS = (1, 2, STATE_VERSION)

GPU_UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""NVIDIA's GPU UUID form, as NVML prints it."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class GpuState:
    """What changes on one simulated GPU and must outlive a restart.

    ``instances`` are the GPU instances (with their compute instances) in the current MIG mode,
    sorted by ``gi_id``; they are kept across a gpud restart, as a driver keeps them, and vanish
    only with a GPU reset or a power cycle. ``load`` is what ``set-load`` asked and where the
    counters stood at the last change (:mod:`gpud.hw.sim.telemetry`); None in a file written
    before loads were kept, until the backend gives it one.
    """

    uuid: str
    mig: MigState
    lost: bool = False
    instances: tuple[GpuInstance, ...] = ()
    load: GpuLoad | None = None


SimProcess = tuple[int, int, str | None]
"""``(gpu index, pid, MIG device UUID or None for the whole GPU)``."""


@dataclass(frozen=True, slots=True)
class SimFaults:
    """Faults a test arms, persisted with the state so they survive (and can be set before) a
    gpud start.

    ``fail_after`` and ``crash_after`` count successful MIG mutations still to go: ``fail_after=k``
    makes the (k+1)-th one fail, ``crash_after=k`` kills the process right after the k-th one is
    on disk. Each is cleared when it fires. Refused calls are not counted: they change nothing,
    so a test can say "after the third change" whatever it probed before. ``processes`` are what
    the GPUs report as running; mode changes and resets of their GPU, and tear-down of what they
    use, refuse with IN_USE.
    """

    fail_after: int | None = None
    crash_after: int | None = None
    processes: tuple[SimProcess, ...] = ()

    def processes_on(self, index: int) -> tuple[GpuProcess, ...]:
        return tuple(GpuProcess(pid, uuid) for gpu, pid, uuid in self.processes if gpu == index)

    def after_mutation(self) -> tuple[SimFaults, bool]:
        """The faults after one more successful mutation, and whether the process dies now."""
        fail = None if self.fail_after is None else self.fail_after - 1
        crash = None if self.crash_after is None else self.crash_after - 1
        dies = crash == 0
        return replace(self, fail_after=fail, crash_after=None if dies else crash), dies


NO_FAULTS = SimFaults()


@dataclass(frozen=True, slots=True)
class SimState:
    """Everything one state file holds: the GPUs and the armed faults."""

    gpus: tuple[GpuState, ...]
    faults: SimFaults = NO_FAULTS

    def with_gpu(self, index: int, gpu: GpuState) -> SimState:
        return replace(self, gpus=(*self.gpus[:index], gpu, *self.gpus[index + 1 :]))


def families(machine: MachineSpec) -> tuple[Family | None, ...]:
    """Each GPU's MIG family (None: not MIG-capable), looked up once per machine."""
    return tuple(
        family_for(slot.model.pci_device_id) if slot.model.mig_capable else None
        for slot in machine.gpus
    )


def state_file(state_dir: Path, spec: str) -> Path:
    """One file per machine spec, so switching ``simulate:`` never reuses another machine's UUIDs.

    Canonical specs hold no ``_``, so replacing their one unsafe character (the ``:`` of
    ``MODEL:COUNT``) by it never makes two of them share a file.
    """
    return state_dir / "sim" / f"{_UNSAFE.sub('_', spec)}.json"


def new_gpu_uuid() -> str:
    digits = os.urandom(16).hex()
    return f"GPU-{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def initial_state(machine: MachineSpec, at_s: float) -> SimState:
    """A machine as first powered on at ``at_s``: fresh UUIDs, MIG off where the board has it,
    nothing lost, no instances, no faults, counters from zero under the moving load."""
    off = MigState(MigMode.DISABLED, MigMode.DISABLED)
    return SimState(
        tuple(
            GpuState(
                new_gpu_uuid(),
                off if slot.model.mig_capable else MIG_UNSUPPORTED,
                load=GpuLoad(Checkpoint(at_s)),
            )
            for slot in machine.gpus
        )
    )


def fault_problems(gpus: tuple[GpuState, ...], faults: SimFaults) -> list[str]:
    """Why ``faults`` cannot be armed on ``gpus``; empty when they can.

    A process names a GPU by index and, when it runs on a MIG device, one that exists on that GPU,
    so that every listed process blocks something real.
    """
    problems: list[str] = []
    for name, value, least in (
        ("fail_after", faults.fail_after, 0),
        ("crash_after", faults.crash_after, 1),
    ):
        if value is not None and (not _is_int(value) or value < least):
            problems.append(f"{name} must be None or an integer >= {least}, got {value!r}")
    if not isinstance(faults.processes, tuple):
        return [*problems, f"processes must be a tuple, got {faults.processes!r}"]
    for entry in faults.processes:
        if not (isinstance(entry, tuple) and len(entry) == 3):
            problems.append(f"process {entry!r} is not (gpu index, pid, MIG UUID or None)")
            continue
        index, pid, uuid = entry
        if not (_is_int(index) and 0 <= index < len(gpus)):
            problems.append(f"process {entry!r}: no GPU with index {index!r}")
            continue
        if not (_is_int(pid) and pid > 0):
            problems.append(f"process {entry!r}: a pid is a positive integer")
        if uuid is not None and uuid not in mig.mig_uuids(gpus[index].instances):
            problems.append(f"process {entry!r}: GPU {index} has no MIG device {uuid!r}")
    return problems


def encode(machine: MachineSpec, sim: SimState) -> bytes:
    document = {
        "version": STATE_VERSION,
        "spec": machine.spec,
        "gpus": [
            {
                "uuid": gpu.uuid,
                "mig_mode": {"current": gpu.mig.current.value, "pending": gpu.mig.pending.value},
                "lost": gpu.lost,
                "gpu_instances": [_encode_gi(gi) for gi in gpu.instances],
                **({} if gpu.load is None else {"load": _encode_load(gpu.load)}),
            }
            for gpu in sim.gpus
        ],
        "faults": {
            "fail_after": sim.faults.fail_after,
            "crash_after": sim.faults.crash_after,
            "processes": [
                {"gpu": gpu, "pid": pid, "mig_uuid": uuid}
                for gpu, pid, uuid in sim.faults.processes
            ],
        },
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def _encode_gi(gi: GpuInstance) -> dict[str, object]:
    # CI sizes are not stored: the catalog knows them from the profile, and a stored copy could
    # only disagree with it.
    return {
        "gi_id": gi.gi_id,
        "profile_id": gi.profile_id,
        "placement": {"start": gi.placement.start, "size": gi.placement.size},
        "compute_instances": [
            {
                "ci_id": ci.ci_id,
                "profile_id": ci.profile_id,
                "start": ci.start,
                "mig_uuid": ci.mig_uuid,
            }
            for ci in gi.compute_instances
        ],
    }


def _encode_setting(load: Load) -> dict[str, object]:
    return {"utilization_pct": load.utilization_pct, "memory_used_mib": load.memory_used_mib}


def _encode_load(load: GpuLoad) -> dict[str, object]:
    point = load.checkpoint
    return {
        "checkpoint": {
            "at_s": point.at_s,
            "energy_mj": point.energy_mj,
            "activity": point.activity,
            "lag_pct": point.lag_pct,
            "instance_activity": [
                {"gi_id": gi_id, "activity": value} for gi_id, value in point.instance_activity
            ],
        },
        "whole": _encode_setting(load.whole),
        "instances": [
            {"gi_id": gi_id, **_encode_setting(setting)} for gi_id, setting in load.instances
        ],
    }


def decode(machine: MachineSpec, data: bytes) -> SimState:
    """The state in ``data``, checked against ``machine``; ValueError says what does not fit.

    Instances are checked with the same rules the create calls enforce, so a hand-edited file
    cannot hold a layout no driver would have built.
    """
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("the file does not hold a JSON object")
    version = document.get("version")
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"state version {version!r} is not supported (expected {STATE_VERSION}; "
            "version 1 is migrated)"
        )
    if document.get("spec") != machine.spec:
        raise ValueError(f"it describes machine {document.get('spec')!r}, not {machine.spec!r}")
    entries = document.get("gpus")
    if not isinstance(entries, list) or len(entries) != len(machine.gpus):
        raise ValueError(f"it does not list the {len(machine.gpus)} GPUs of {machine.spec}")
    gpus = tuple(
        _decode_gpu(index, entry, slot.model.mig_capable, family, version)
        for index, (entry, slot, family) in enumerate(
            zip(entries, machine.gpus, families(machine), strict=True)
        )
    )
    for index, (gpu, slot, family) in enumerate(
        zip(gpus, machine.gpus, families(machine), strict=True)
    ):
        if gpu.load is not None:
            problems = _load_fit(index, slot.model.key, slot.model.memory_mib, gpu, family)
            if problems:
                raise ValueError(f"GPU {index}: unusable load: {'; '.join(problems)}")
    if len({gpu.uuid for gpu in gpus}) != len(gpus):
        raise ValueError("two GPUs share a UUID")
    uuids = [uuid for gpu in gpus for uuid in mig.mig_uuids(gpu.instances)]
    if len(set(uuids)) != len(uuids):
        raise ValueError("two MIG devices share a UUID")
    faults = NO_FAULTS if version == 1 else _decode_faults(document.get("faults"))
    problems = fault_problems(gpus, faults)
    if problems:
        raise ValueError(f"unusable faults: {'; '.join(problems)}")
    return SimState(gpus, faults)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(entry: dict[str, object], key: str, where: str) -> int:
    value = entry.get(key)
    if not _is_int(value):
        raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
    assert isinstance(value, int)
    return value


def _decode_gpu(
    index: int, entry: object, mig_capable: bool, family: Family | None, version: int
) -> GpuState:
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
    mig_state = MigState(current, pending)
    fits = (
        MigMode.UNSUPPORTED not in (current, pending)
        if mig_capable
        else mig_state == MIG_UNSUPPORTED
    )
    if not fits:
        raise ValueError(f"GPU {index}: MIG mode {mig_state.describe()} does not fit this board")
    raw = [] if version == 1 else entry.get("gpu_instances")
    if not isinstance(raw, list):
        raise ValueError(f"GPU {index}: 'gpu_instances' must be a list, got {raw!r}")
    if raw and (family is None or current is not MigMode.ENABLED):
        raise ValueError(f"GPU {index} has GPU instances but MIG is not enabled on it")
    instances: tuple[GpuInstance, ...] = ()
    if family is not None:
        instances = tuple(_decode_gi(f"GPU {index}", gi, family) for gi in raw)
        problems = mig.layout_problems(family, instances)
        if problems:
            raise ValueError(f"GPU {index}: impossible MIG layout: {'; '.join(problems)}")
    load = None
    if version >= 3 and "load" in entry:
        load = _decode_load(f"GPU {index}", entry["load"])
    return GpuState(uuid, mig_state, lost, instances, load)


def _number(entry: dict[str, object], key: str, where: str, least: float = 0.0) -> float:
    value = entry.get(key)
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= least
    ):
        raise ValueError(f"{where}: {key!r} must be a number >= {least:g}, got {value!r}")
    return float(value)


def _decode_setting(entry: dict[str, object], where: str) -> Load:
    util, memory = entry.get("utilization_pct"), entry.get("memory_used_mib")
    if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float))):
        raise ValueError(f"{where}: 'utilization_pct' must be a number or null, got {util!r}")
    if memory is not None and not _is_int(memory):
        raise ValueError(f"{where}: 'memory_used_mib' must be an integer or null, got {memory!r}")
    return Load(util, memory)  # type: ignore[arg-type]


def _decode_load(where: str, entry: object) -> GpuLoad:
    where = f"{where}, load"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: not a JSON object: {entry!r}")
    point, whole, instances = entry.get("checkpoint"), entry.get("whole"), entry.get("instances")
    if not isinstance(point, dict) or not isinstance(whole, dict):
        raise ValueError(f"{where}: 'checkpoint' and 'whole' must be objects")
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise ValueError(f"{where}: 'instances' must be a list of objects, got {instances!r}")
    activities = point.get("instance_activity")
    if not isinstance(activities, list) or not all(isinstance(a, dict) for a in activities):
        raise ValueError(f"{where}: 'instance_activity' must be a list of objects")
    lag = _number(point, "lag_pct", where)
    if lag > 100:
        raise ValueError(f"{where}: 'lag_pct' must be at most 100, got {lag!r}")
    checkpoint = Checkpoint(
        at_s=_number(point, "at_s", where),
        energy_mj=_number(point, "energy_mj", where),
        activity=_number(point, "activity", where),
        lag_pct=lag,
        instance_activity=tuple(
            (_field(a, "gi_id", where), _number(a, "activity", where)) for a in activities
        ),
    )
    settings = tuple(
        (_field(i, "gi_id", where), _decode_setting(i, f"{where}, GPU instance {i.get('gi_id')}"))
        for i in instances
    )
    return GpuLoad(checkpoint, _decode_setting(whole, where), settings)


def _load_fit(
    index: int, model: str, memory_mib: int, gpu: GpuState, family: Family | None
) -> list[str]:
    """Why ``gpu``'s load does not fit its board and layout; empty when it does."""
    assert gpu.load is not None
    found = parts(index, memory_mib, BOARDS[model], gpu.mig, gpu.instances, family, gpu.load)
    problems = [p for part in found for p in load_problems(part.load, part)]
    if gpu.load.whole != AUTOMATIC and not any(part.gi_id is None for part in found):
        whole_parts = parts(index, memory_mib, BOARDS[model], MIG_UNSUPPORTED, (), None, gpu.load)
        problems += load_problems(gpu.load.whole, whole_parts[0])
    existing = {gi.gi_id for gi in gpu.instances}
    problems += [
        f"a load for GPU instance {gi_id}, which does not exist"
        for gi_id, _ in gpu.load.instances
        if gi_id not in existing
    ]
    return problems


def _decode_gi(where: str, entry: object, family: Family) -> GpuInstance:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a GPU instance is not a JSON object: {entry!r}")
    gi_id = _field(entry, "gi_id", where)
    where = f"{where}, GPU instance {gi_id}"
    profile_id = _field(entry, "profile_id", where)
    placement = entry.get("placement")
    if not isinstance(placement, dict):
        raise ValueError(f"{where}: 'placement' must be an object, got {placement!r}")
    start, size = _field(placement, "start", where), _field(placement, "size", where)
    cis = entry.get("compute_instances")
    if not isinstance(cis, list):
        raise ValueError(f"{where}: 'compute_instances' must be a list, got {cis!r}")
    profile = next((p for p in family.profiles if p.profile_id == profile_id), None)
    if profile is None:
        raise ValueError(f"{where}: unknown GPU instance profile {profile_id}")
    sizes = {ci.profile_id: ci.slices for ci in profile.compute_profiles}
    computes = []
    for ci in cis:
        if not isinstance(ci, dict):
            raise ValueError(f"{where}: a compute instance is not a JSON object: {ci!r}")
        ci_id = _field(ci, "ci_id", where)
        ci_profile = _field(ci, "profile_id", f"{where}, compute instance {ci_id}")
        if ci_profile not in sizes:
            raise ValueError(f"{where}: {profile.name} has no compute profile {ci_profile}")
        mig_uuid = ci.get("mig_uuid")
        if not isinstance(mig_uuid, str):
            raise ValueError(f"{where}: compute instance {ci_id} has no MIG UUID: {mig_uuid!r}")
        ci_start = _field(ci, "start", f"{where}, compute instance {ci_id}")
        computes.append(ComputeInstance(ci_id, ci_profile, sizes[ci_profile], ci_start, mig_uuid))
    return GpuInstance(gi_id, profile_id, Placement(start, size), tuple(computes))


def _decode_faults(entry: object) -> SimFaults:
    if not isinstance(entry, dict):
        raise ValueError(f"'faults' must be an object, got {entry!r}")
    processes = entry.get("processes")
    if not isinstance(processes, list):
        raise ValueError(f"faults: 'processes' must be a list, got {processes!r}")
    listed: list[SimProcess] = []
    for process in processes:
        if not isinstance(process, dict):
            raise ValueError(f"faults: a process is not a JSON object: {process!r}")
        listed.append((process.get("gpu"), process.get("pid"), process.get("mig_uuid")))  # type: ignore[arg-type]
    return SimFaults(entry.get("fail_after"), entry.get("crash_after"), tuple(listed))  # type: ignore[arg-type]
