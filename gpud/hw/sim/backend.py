"""The ``sim`` backend: a catalog machine plus its remembered state, behind the Backend protocol.

It answers like NVML does: ``open`` fails as ``nvmlInit`` does while the simulated driver is not
loaded or not installed (:mod:`.driver`), calls before ``open`` or after ``close`` fail
UNINITIALIZED, a lost GPU
refuses further XIDs and every MIG call with GPU_IS_LOST, and a lost GPU stays lost across a
daemon restart until :meth:`SimBackend.reset_gpu` (a real one until a reset or reboot).

MIG follows the driver's rules (:mod:`.mig`) with NVML's error kinds, so the MIG planner and
applier can be proven without a GPU. Every MIG mutation is on disk before it returns, as the
driver's state is the moment NVML returns: a gpud killed at any point restarts to exactly the
layout that was acknowledged. Faults armed with :meth:`SimBackend.set_faults` (or
:func:`write_faults` while gpud is stopped) make the n-th mutation fail or kill the process, and
list processes that keep instances busy.

Telemetry (:meth:`SimBackend.read_telemetry`) is computed from the time and each GPU's load
(:mod:`.telemetry`); :meth:`SimBackend.set_load` sets a GPU's or instance's load and, like every
other change, is on disk before it returns, so a restarted gpud reads the same counters on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from gpud.atomic import write_atomic
from gpud.hw.backend import EventSink
from gpud.hw.errors import UNAVAILABLE_ADVICE, BackendUnavailable, ErrorKind, HwError
from gpud.hw.sim import driver, mig, state, telemetry
from gpud.hw.sim.machines import (
    CUDA_VERSION,
    DRIVER_VERSION,
    NVML_VERSION,
    MachineSpec,
    parse_spec,
)
from gpud.hw.sim.state import GpuState, SimFaults, SimState
from gpud.hw.telemetry import GpuReading
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    NO_INSTANCE,
    ComputeInstance,
    EventKind,
    GiProfile,
    GpuInfo,
    GpuInstance,
    GpuProcess,
    HwEvent,
    MigLayoutState,
    MigMode,
    MigState,
    NvLinkPeer,
    Placement,
    SystemInfo,
)
from gpud.mig.catalog import Family

__all__ = ["SimBackend", "SimFaults", "describe", "power_cycle_state", "write_faults"]

T = TypeVar("T")

Processes = tuple[GpuProcess, ...]

# A change to one GPU: (its state, its MIG family, the processes on it) -> (its new state, what the
# call returns); raises HwError to refuse.
Change = Callable[[GpuState, "Family | None", Processes], tuple[GpuState, T]]


def describe(machine: MachineSpec, gpus: tuple[GpuState, ...]) -> list[GpuInfo]:
    """The GpuInfo NVML would report for ``machine`` in state ``gpus``; a lost GPU keeps its facts
    (and its NVLinks), only ``lost`` says it fell off the bus."""
    return [
        GpuInfo(
            index=index,
            uuid=gpu.uuid,
            name=slot.model.product_name,
            pci_bus_id=slot.pci_bus_id,
            pci_device_id=slot.model.pci_device_id,
            memory_mib=slot.model.memory_mib,
            minor_number=index,
            numa_node=slot.numa_node,
            mig=gpu.mig,
            nvlink_peers=tuple(
                NvLinkPeer(gpus[peer].uuid, links) for peer, links in slot.nvlink_peers
            ),
            pcie_switch=slot.pcie_switch,
            lost=gpu.lost,
            compute_capability=slot.model.compute_capability,
        )
        for index, (slot, gpu) in enumerate(zip(machine.gpus, gpus, strict=True))
    ]


def _os_error_kind(error: OSError) -> ErrorKind:
    if isinstance(error, PermissionError):
        return ErrorKind.NO_PERMISSION
    return ErrorKind.OPERATING_SYSTEM


def _checked_index(index: int, count: int) -> int:
    if not 0 <= index < count:
        known = "GPU 0" if count == 1 else f"GPUs 0-{count - 1}"
        raise HwError(
            ErrorKind.INVALID_ARGUMENT, f"no GPU with index {index}; this machine has {known}"
        )
    return index


class SimBackend:
    """A simulated machine; a :class:`gpud.hw.backend.FaultInjector`, a
    :class:`gpud.hw.backend.MigBackend` and a :class:`gpud.hw.backend.LoadSimulator`.

    ``spec`` is parsed at construction (ValueError for an unknown machine), so a bad ``simulate:``
    fails while the config is read; the state file is touched only by ``open`` and mutations.
    One re-entrant lock guards the state and event delivery: injections may come from any thread,
    events reach the sink in order and never after ``close`` returns. The sink runs under that
    lock, so it may call back into the backend but must not wait for another thread that does.
    ``clock`` is the wall clock telemetry runs on (tests step it).
    """

    name = "sim"

    def __init__(
        self, spec: str, state_dir: Path, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.machine = parse_spec(spec)
        self.state_dir = state_dir
        self.state_path = state.state_file(state_dir, self.machine.spec)
        self.driver = driver.signals(state_dir)
        self._lock = threading.RLock()
        self._state: SimState | None = None
        self._sink: EventSink | None = None
        self._families = state.families(self.machine)
        # mig_state runs after every apply: the profile tables are looked up once, here.
        self._profiles: tuple[tuple[GiProfile, ...], ...] = tuple(
            () if family is None else family.profiles for family in self._families
        )
        self._clock = clock
        self._boards = tuple(telemetry.BOARDS[slot.model.key] for slot in self.machine.gpus)
        # The previous read of each GPU, for rates; not kept across a restart, as NVML's aren't.
        self._samples: dict[int, telemetry.Sample] = {}

    def open(self) -> None:
        """Load the machine's state, creating it (new UUIDs) only when there is no state file.

        Like ``nvmlInit``, fails with DRIVER_NOT_LOADED or LIBRARY_NOT_FOUND (and NVML's advice)
        while the simulated driver is not there, and works when called again once it is. A state
        file that cannot be read raises BackendUnavailable naming it: replacing it would give
        every GPU a new UUID behind kubelet's back, so moving it away is the operator's call.
        """
        with self._lock:
            if self._state is None:
                self._require_driver()
                self._state = self._load()

    def _require_driver(self) -> None:
        try:
            found = driver.read_driver(self.state_dir)
        except ValueError as error:
            raise BackendUnavailable(ErrorKind.INVALID_ARGUMENT, str(error)) from error
        except OSError as error:
            raise BackendUnavailable(
                _os_error_kind(error), f"cannot read the simulated driver's state: {error}"
            ) from error
        kind = {
            driver.DriverState.NOT_LOADED: ErrorKind.DRIVER_NOT_LOADED,
            driver.DriverState.NOT_INSTALLED: ErrorKind.LIBRARY_NOT_FOUND,
        }.get(found)
        if kind is not None:
            raise BackendUnavailable(kind, UNAVAILABLE_ADVICE[kind])

    def close(self) -> None:
        with self._lock:
            self._state = None
            self._sink = None
            self._samples.clear()

    def system(self) -> SystemInfo:
        with self._lock:
            self._require_open()
        return SystemInfo(self.name, DRIVER_VERSION, CUDA_VERSION, NVML_VERSION)

    def gpus(self) -> list[GpuInfo]:
        with self._lock:
            gpus = self._require_open().gpus
        return describe(self.machine, gpus)

    def start_events(self, sink: EventSink) -> None:
        with self._lock:
            self._require_open()
            self._sink = sink

    # ---- telemetry -----------------------------------------------------------------------------

    def read_telemetry(self, index: int) -> GpuReading:
        """GPU ``index`` now, as :mod:`.telemetry` computes it; makes no NVML call (0 counted)."""
        with self._lock:
            gpus = self._require_open().gpus
            index = _checked_index(index, len(gpus))
            gpu = gpus[index]
            if gpu.lost:
                self._samples.pop(index, None)
                return GpuReading(index, gpu.uuid, lost=True)
            load = gpu.load
            assert load is not None  # every GPU gets one when the state is loaded
            slot = self.machine.gpus[index]
            board = self._boards[index]
            current = telemetry.sample(
                index,
                gpu.uuid,
                board,
                slot.model.memory_mib,
                slot.model.nvlink and bool(slot.nvlink_peers),
                gpu.mig.current is MigMode.ENABLED,
                self._parts(index, gpu),
                load.checkpoint,
                self._clock(),
            )
            previous = self._samples.get(index)
            self._samples[index] = current
        return telemetry.reading(board, previous, current)

    def set_load(
        self,
        index: int,
        gi_id: int | None = None,
        *,
        utilization_pct: float | None = None,
        memory_used_mib: int | None = None,
        automatic: bool = False,
    ) -> str:
        """Set GPU ``index``'s load (MIG off), or that of its GPU instance ``gi_id`` (MIG on).

        A value not given keeps its setting; ``automatic`` first returns both to the moving
        pattern. Persisted before it returns. INVALID_ARGUMENT for an unknown GPU or instance, a
        whole-GPU load on a MIG GPU (its instances run the load), a value out of range, or
        nothing to set; GPU_IS_LOST for a lost GPU.
        """
        if utilization_pct is None and memory_used_mib is None and not automatic:
            raise HwError(
                ErrorKind.INVALID_ARGUMENT,
                "nothing to set: give a utilization, a memory size, or automatic",
            )
        with self._lock:
            current = self._require_open()
            index = _checked_index(index, len(current.gpus))
            gpu = current.gpus[index]
            if gpu.lost:
                raise _lost(index)
            load = gpu.load
            assert load is not None
            part = self._part_of(index, gpu, gi_id)
            base = telemetry.AUTOMATIC if automatic else part.load
            wanted = replace(
                base,
                **({} if utilization_pct is None else {"utilization_pct": utilization_pct}),
                **({} if memory_used_mib is None else {"memory_used_mib": memory_used_mib}),
            )
            problems = telemetry.load_problems(wanted, part)
            if problems:
                raise HwError(ErrorKind.INVALID_ARGUMENT, f"GPU {index}: {'; '.join(problems)}")
            now = self._clock()
            checkpoint = telemetry.checkpoint_at(
                self._boards[index], self._parts(index, gpu), load.checkpoint, now
            )
            if gi_id is None:
                updated = replace(load, checkpoint=checkpoint, whole=wanted)
            else:
                others = tuple((g, s) for g, s in load.instances if g != gi_id)
                chosen = () if wanted == telemetry.AUTOMATIC else ((gi_id, wanted),)
                updated = replace(
                    load, checkpoint=checkpoint, instances=tuple(sorted(others + chosen))
                )
            self._commit(current.with_gpu(index, replace(gpu, load=updated)))
            return wanted.describe()

    def _parts(self, index: int, gpu: GpuState) -> tuple[telemetry.Part, ...]:
        assert gpu.load is not None
        return telemetry.parts(
            index,
            self.machine.gpus[index].model.memory_mib,
            self._boards[index],
            gpu.mig,
            gpu.instances,
            self._families[index],
            gpu.load,
        )

    def _part_of(self, index: int, gpu: GpuState, gi_id: int | None) -> telemetry.Part:
        """What ``set-load`` would change: the GPU, or its instance ``gi_id``."""
        found = {part.gi_id: part for part in self._parts(index, gpu)}
        if gi_id in found:
            return found[gi_id]
        held = ", ".join(str(gi) for gi in sorted(g for g in found if g is not None))
        if gi_id is None:
            raise HwError(
                ErrorKind.INVALID_ARGUMENT,
                f"GPU {index} is in MIG mode: its GPU instances run the load; name one with "
                f"--gi ({held or 'it has none yet'})",
            )
        if None in found:
            raise HwError(
                ErrorKind.INVALID_ARGUMENT,
                f"GPU {index} has no GPU instance {gi_id}: MIG is {gpu.mig.describe()}",
            )
        raise HwError(
            ErrorKind.INVALID_ARGUMENT,
            f"GPU {index} has no GPU instance {gi_id}; it has {held or 'none'}",
        )

    # ---- fault injection -----------------------------------------------------------------------

    def inject_xid(
        self, index: int, xid: int, gi_id: int = NO_INSTANCE, ci_id: int = NO_INSTANCE
    ) -> HwEvent:
        """Raise XID ``xid`` on GPU ``index`` as the driver would; delivered before returning.

        ``gi_id``/``ci_id`` scope it to a MIG instance. They are not checked against the GPU's
        instances: the driver may report one that was destroyed a moment ago, and what gpud does
        with such an event is part of what is under test.
        """
        if xid <= 0:
            raise HwError(ErrorKind.INVALID_ARGUMENT, f"an XID is a positive integer, got {xid}")
        for what, value in (("GPU instance", gi_id), ("compute instance", ci_id)):
            if not 0 <= value <= NO_INSTANCE:
                raise HwError(
                    ErrorKind.INVALID_ARGUMENT, f"a {what} ID is an integer >= 0, got {value}"
                )
        if gi_id == NO_INSTANCE and ci_id != NO_INSTANCE:
            raise HwError(
                ErrorKind.INVALID_ARGUMENT, "a compute instance is scoped by its GPU instance"
            )
        with self._lock:
            gpus = self._require_open().gpus
            gpu = gpus[_checked_index(index, len(gpus))]
            if gpu.lost:
                raise HwError(
                    ErrorKind.GPU_IS_LOST,
                    f"GPU {index} is lost and raises no more XIDs; reset it first",
                )
            return self._deliver(
                HwEvent(
                    EventKind.XID,
                    gpu.uuid,
                    xid=xid,
                    gi_id=gi_id,
                    ci_id=ci_id,
                    detail=f"injected XID {xid}",
                )
            )

    def inject_gpu_lost(self, index: int) -> HwEvent:
        """Make GPU ``index`` fall off the bus; it stays lost, across restarts, until reset."""
        with self._lock:
            current = self._require_open()
            index = _checked_index(index, len(current.gpus))
            gpu = current.gpus[index]
            if not gpu.lost:
                self._commit(current.with_gpu(index, replace(gpu, lost=True)))
            return self._deliver(HwEvent(EventKind.GPU_LOST, gpu.uuid, detail="injected"))

    def set_faults(self, faults: SimFaults) -> None:
        """Arm ``faults`` in place of any armed before; the mutation counts start now.

        Persisted at once, so a test may arm them and then restart gpud. INVALID_ARGUMENT when a
        count is negative (``crash_after`` must be at least 1) or a process names a GPU or MIG
        device that does not exist.
        """
        with self._lock:
            current = self._require_open()
            problems = state.fault_problems(current.gpus, faults)
            if problems:
                raise HwError(ErrorKind.INVALID_ARGUMENT, "; ".join(problems))
            self._commit(replace(current, faults=faults))

    def faults(self) -> SimFaults:
        """The armed faults, with the counts that remain."""
        with self._lock:
            return self._require_open().faults

    def power_cycle(self) -> None:
        """Power the machine off and on: pending MIG modes take effect, GPU and compute instances
        vanish, processes end and lost GPUs come back; UUIDs stay.

        Not an NVML call, so it is not counted as a mutation; armed fail/crash counts are kept.
        Telemetry counters start from zero, as after a driver load; whole-GPU loads stay set.
        """
        with self._lock:
            current = self._require_open()
            now = self._clock()
            gpus = tuple(
                GpuState(
                    gpu.uuid,
                    MigState(gpu.mig.pending, gpu.mig.pending),
                    # The driver loads afresh: counters start again; instance loads went with them.
                    load=telemetry.GpuLoad(
                        telemetry.Checkpoint(now),
                        whole=gpu.load.whole if gpu.load else telemetry.AUTOMATIC,
                    ),
                )
                for gpu in current.gpus
            )
            self._samples.clear()
            self._commit(SimState(gpus, replace(current.faults, processes=())))

    # ---- MIG -----------------------------------------------------------------------------------

    def mig_state(self, index: int) -> MigLayoutState:
        """The GPU's MIG mode, profiles and instances.

        The profiles are reported also while MIG is off (real NVML describes none then) so that a
        layout can be checked before the mode is changed; a GPU without MIG reports none.
        """
        with self._lock:
            gpus = self._require_open().gpus
            index = self._mig_index(index, gpus)
            gpu = gpus[index]
        slot = self.machine.gpus[index]
        return MigLayoutState(
            index, gpu.uuid, slot.model.pci_device_id, gpu.mig, self._profiles[index], gpu.instances
        )

    def processes(self, index: int) -> tuple[GpuProcess, ...]:
        """The processes listed in the armed faults for this GPU (none unless a test lists some)."""
        with self._lock:
            current = self._require_open()
            index = self._mig_index(index, current.gpus)
            return current.faults.processes_on(index)

    def set_mig_mode(self, index: int, enabled: bool) -> MigState:
        def change(
            gpu: GpuState, family: Family | None, processes: Processes
        ) -> tuple[GpuState, MigState]:
            mode = mig.set_mode(family, gpu.mig, gpu.instances, processes, enabled)
            return replace(gpu, mig=mode), mode

        return self._mutate(index, "set_mig_mode", change)

    def reset_gpu(self, index: int) -> MigState:
        """Reset GPU ``index``: a pending MIG mode takes effect, instances vanish, and a lost GPU
        comes back (the one MIG call a lost GPU answers, since a reset is what cures it).

        Refused with IN_USE while processes use the GPU, as ``nvidia-smi -r`` is.
        """

        def change(
            gpu: GpuState, family: Family | None, processes: Processes
        ) -> tuple[GpuState, MigState]:
            mode = mig.reset(gpu.mig, processes)
            return GpuState(gpu.uuid, mode), mode

        return self._mutate(index, "reset_gpu", change, lost_ok=True)

    def create_gpu_instance(self, index: int, profile_id: int, placement: Placement) -> GpuInstance:
        def change(
            gpu: GpuState, family: Family | None, _: Processes
        ) -> tuple[GpuState, GpuInstance]:
            instances, gi = mig.create_gpu_instance(
                _mig_on(family, gpu), gpu.instances, profile_id, placement
            )
            return replace(gpu, instances=instances), gi

        return self._mutate(index, "create_gpu_instance", change)

    def create_compute_instance(
        self, index: int, gi_id: int, ci_profile_id: int
    ) -> ComputeInstance:
        def change(
            gpu: GpuState, family: Family | None, _: Processes
        ) -> tuple[GpuState, ComputeInstance]:
            uuid = mig.new_mig_uuid(self._all_mig_uuids())
            instances, ci = mig.create_compute_instance(
                _mig_on(family, gpu), gpu.instances, gi_id, ci_profile_id, uuid
            )
            return replace(gpu, instances=instances), ci

        return self._mutate(index, "create_compute_instance", change)

    def destroy_compute_instance(self, index: int, gi_id: int, ci_id: int) -> None:
        def change(
            gpu: GpuState, family: Family | None, processes: Processes
        ) -> tuple[GpuState, None]:
            instances = mig.destroy_compute_instance(gpu.instances, gi_id, ci_id, processes)
            return replace(gpu, instances=instances), None

        self._mutate(index, "destroy_compute_instance", change)

    def destroy_gpu_instance(self, index: int, gi_id: int) -> None:
        def change(
            gpu: GpuState, family: Family | None, processes: Processes
        ) -> tuple[GpuState, None]:
            instances = mig.destroy_gpu_instance(gpu.instances, gi_id, processes)
            return replace(gpu, instances=instances), None

        self._mutate(index, "destroy_gpu_instance", change)

    # ---- internals -----------------------------------------------------------------------------

    def _mutate(self, index: int, call: str, change: Change[T], *, lost_ok: bool = False) -> T:
        """Apply one NVML mutation to GPU ``index``: check, persist, then adopt.

        The order is NVML's: not initialised, bad index, lost GPU; then an armed ``fail_after``
        that has run out fails the call (and is disarmed, on disk); then the driver's rules. A
        successful mutation is written together with the decremented fault counts, so an armed
        ``crash_after`` that fires is already disarmed in the file the restarted gpud reads.
        """
        with self._lock:
            current = self._require_open()
            index = _checked_index(index, len(current.gpus))
            gpu = current.gpus[index]
            if gpu.lost and not lost_ok:
                raise _lost(index)
            faults = current.faults
            if faults.fail_after == 0:
                self._commit(replace(current, faults=replace(faults, fail_after=None)))
                raise HwError(
                    ErrorKind.UNKNOWN,
                    f"injected failure of {call} on GPU {index} (fail_after); nothing changed",
                )
            try:
                updated, result = change(gpu, self._families[index], faults.processes_on(index))
            except HwError as error:
                raise HwError(error.kind, f"GPU {index}: {error.args[0]}") from None
            faults, crash = faults.after_mutation()
            updated = self._relayout(index, gpu, updated)
            self._commit(replace(current.with_gpu(index, updated), faults=faults))
            if crash:
                # A crash at the worst moment: the change is on disk, the caller never hears of it.
                os.kill(os.getpid(), signal.SIGKILL)
            return result

    def _relayout(self, index: int, before: GpuState, after: GpuState) -> GpuState:
        """``after`` with its load carried over from ``before``: when what runs on the GPU
        changed (MIG mode, instances), the counters are checkpointed under the old layout, loads
        of instances that are gone are dropped, and the previous read no longer counts."""
        load = before.load
        assert load is not None
        if (before.mig.current, before.instances) == (after.mig.current, after.instances):
            return replace(after, load=load)
        checkpoint = telemetry.checkpoint_at(
            self._boards[index], self._parts(index, before), load.checkpoint, self._clock()
        )
        existing = {gi.gi_id for gi in after.instances}
        kept = tuple((gi, s) for gi, s in load.instances if gi in existing)
        activity = tuple((gi, a) for gi, a in checkpoint.instance_activity if gi in existing)
        checkpoint = replace(checkpoint, instance_activity=activity)
        self._samples.pop(index, None)
        return replace(after, load=replace(load, checkpoint=checkpoint, instances=kept))

    def _mig_index(self, index: int, gpus: tuple[GpuState, ...]) -> int:
        index = _checked_index(index, len(gpus))
        if gpus[index].lost:
            raise _lost(index)
        return index

    def _all_mig_uuids(self) -> list[str]:
        return [u for gpu in self._require_open().gpus for u in mig.mig_uuids(gpu.instances)]

    def _load(self) -> SimState:
        path = self.state_path
        try:
            data = path.read_bytes()
            written = path.stat().st_mtime
        except FileNotFoundError:
            fresh = state.initial_state(self.machine, self._clock())
            self._save(fresh, BackendUnavailable)
            return fresh
        except OSError as error:
            raise BackendUnavailable(
                _os_error_kind(error), f"cannot read simulated GPU state {path}: {error}"
            ) from error
        try:
            decoded = state.decode(self.machine, data)
        except ValueError as error:
            raise BackendUnavailable(
                ErrorKind.INVALID_ARGUMENT,
                f"simulated GPU state {path} is unusable: {error}. Move it away to start "
                f"{self.machine.spec} afresh (its GPUs then get new UUIDs)",
            ) from error
        # A file from before loads were kept: counters run from when it was last written, the
        # same on every start until the next change writes them down.
        return replace(
            decoded,
            gpus=tuple(
                gpu if gpu.load is not None else replace(gpu, load=telemetry.fresh(written))
                for gpu in decoded.gpus
            ),
        )

    def _save(self, sim: SimState, error_type: type[HwError] = HwError) -> None:
        try:
            write_atomic(self.state_path, state.encode(self.machine, sim))
        except OSError as error:
            raise error_type(
                _os_error_kind(error),
                f"cannot write simulated GPU state {self.state_path}: {error}",
            ) from error

    def _commit(self, sim: SimState) -> None:
        """Persist ``sim``, then adopt it: a failed write leaves memory and file agreeing."""
        self._save(sim)
        self._state = sim

    def _require_open(self) -> SimState:
        if self._state is None:
            raise HwError(ErrorKind.UNINITIALIZED, "the sim backend is not open; call open() first")
        return self._state

    def _deliver(self, event: HwEvent) -> HwEvent:
        if self._sink is not None:
            self._sink(event)
        return event


def _lost(index: int) -> HwError:
    return HwError(ErrorKind.GPU_IS_LOST, f"GPU {index} is lost; reset it first")


def _mig_on(family: Family | None, gpu: GpuState) -> Family:
    """The family to create instances with; NOT_SUPPORTED unless MIG is currently enabled (a
    pending enable is not enough, as on a real A100 before its reset)."""
    if family is None or gpu.mig == MIG_UNSUPPORTED:
        raise HwError(ErrorKind.NOT_SUPPORTED, "this GPU cannot do MIG")
    if gpu.mig.current is not MigMode.ENABLED:
        raise HwError(ErrorKind.NOT_SUPPORTED, f"MIG mode is {gpu.mig.describe()}, not enabled")
    return family


def _on_file(state_dir: Path, spec: str, action: Callable[[SimBackend], None]) -> None:
    """Run ``action`` on the machine's state file whether or not its driver is loaded: these
    stage a node for a test, they are not a gpud using the GPUs."""
    backend = SimBackend(spec, state_dir)
    with backend._lock:
        backend._state = backend._load()
    try:
        action(backend)
    finally:
        backend.close()


def write_faults(state_dir: Path, spec: str, faults: SimFaults) -> None:
    """Arm ``faults`` in the state file of machine ``spec`` (created if missing), for a test to
    call while gpud is stopped: two writers of one file would lose each other's changes."""
    _on_file(state_dir, spec, lambda backend: backend.set_faults(faults))


def power_cycle_state(state_dir: Path, spec: str) -> None:
    """:meth:`SimBackend.power_cycle` on the state file of machine ``spec``, while gpud is stopped
    (a reboot of the node, as a test stages it)."""
    _on_file(state_dir, spec, lambda backend: backend.power_cycle())
