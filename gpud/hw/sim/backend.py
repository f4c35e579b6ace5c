"""The ``sim`` backend: a catalog machine plus its remembered state, behind the Backend protocol.

It answers like NVML does: calls before ``open`` or after ``close`` fail UNINITIALIZED, a lost GPU
refuses further XIDs with GPU_IS_LOST, and a lost GPU stays lost across a daemon restart until
:meth:`SimBackend.reset_gpu` (a real one until a reboot).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from gpud.hw.backend import EventSink
from gpud.hw.errors import BackendUnavailable, ErrorKind, HwError
from gpud.hw.sim import state
from gpud.hw.sim.machines import (
    CUDA_VERSION,
    DRIVER_VERSION,
    NVML_VERSION,
    MachineSpec,
    parse_spec,
)
from gpud.hw.sim.state import GpuState
from gpud.hw.types import EventKind, GpuInfo, HwEvent, NvLinkPeer, SystemInfo


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
    """A simulated machine; also a :class:`gpud.hw.backend.FaultInjector`.

    ``spec`` is parsed at construction (ValueError for an unknown machine), so a bad ``simulate:``
    fails while the config is read; the state file is touched only by ``open`` and mutations.
    One re-entrant lock guards the state and event delivery: injections may come from any thread,
    events reach the sink in order and never after ``close`` returns. The sink runs under that
    lock, so it may call back into the backend but must not wait for another thread that does.
    """

    name = "sim"

    def __init__(self, spec: str, state_dir: Path) -> None:
        self.machine = parse_spec(spec)
        self.state_path = state.state_file(state_dir, self.machine.spec)
        self._lock = threading.RLock()
        self._gpus: tuple[GpuState, ...] | None = None
        self._sink: EventSink | None = None

    def open(self) -> None:
        """Load the machine's state, creating it (new UUIDs) only when there is no state file.

        A state file that cannot be read raises BackendUnavailable naming it: replacing it would
        give every GPU a new UUID behind kubelet's back, so moving it away is the operator's call.
        """
        with self._lock:
            if self._gpus is None:
                self._gpus = self._load()

    def close(self) -> None:
        with self._lock:
            self._gpus = None
            self._sink = None

    def system(self) -> SystemInfo:
        with self._lock:
            self._require_open()
        return SystemInfo(self.name, DRIVER_VERSION, CUDA_VERSION, NVML_VERSION)

    def gpus(self) -> list[GpuInfo]:
        with self._lock:
            gpus = self._require_open()
        return describe(self.machine, gpus)

    def start_events(self, sink: EventSink) -> None:
        with self._lock:
            self._require_open()
            self._sink = sink

    def inject_xid(self, index: int, xid: int) -> HwEvent:
        """Raise XID ``xid`` on GPU ``index`` as the driver would; delivered before returning."""
        if xid <= 0:
            raise HwError(ErrorKind.INVALID_ARGUMENT, f"an XID is a positive integer, got {xid}")
        with self._lock:
            gpus = self._require_open()
            gpu = gpus[_checked_index(index, len(gpus))]
            if gpu.lost:
                raise HwError(
                    ErrorKind.GPU_IS_LOST,
                    f"GPU {index} is lost and raises no more XIDs; reset it first",
                )
            return self._deliver(
                HwEvent(EventKind.XID, gpu.uuid, xid=xid, detail=f"injected XID {xid}")
            )

    def inject_gpu_lost(self, index: int) -> HwEvent:
        """Make GPU ``index`` fall off the bus; it stays lost, across restarts, until reset."""
        with self._lock:
            uuid = self._set_lost(index, lost=True)
            return self._deliver(HwEvent(EventKind.GPU_LOST, uuid, detail="injected"))

    def reset_gpu(self, index: int) -> None:
        """Bring a lost GPU back, as a GPU reset or reboot would."""
        with self._lock:
            self._set_lost(index, lost=False)

    def _load(self) -> tuple[GpuState, ...]:
        path = self.state_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            gpus = state.initial_state(self.machine)
            self._save(gpus, BackendUnavailable)
            return gpus
        except OSError as error:
            raise BackendUnavailable(
                _os_error_kind(error), f"cannot read simulated GPU state {path}: {error}"
            ) from error
        try:
            return state.decode(self.machine, data)
        except ValueError as error:
            raise BackendUnavailable(
                ErrorKind.INVALID_ARGUMENT,
                f"simulated GPU state {path} is unusable: {error}. Move it away to start "
                f"{self.machine.spec} afresh (its GPUs then get new UUIDs)",
            ) from error

    def _save(self, gpus: tuple[GpuState, ...], error_type: type[HwError] = HwError) -> None:
        try:
            state.write_atomic(self.state_path, state.encode(self.machine, gpus))
        except OSError as error:
            raise error_type(
                _os_error_kind(error),
                f"cannot write simulated GPU state {self.state_path}: {error}",
            ) from error

    def _require_open(self) -> tuple[GpuState, ...]:
        if self._gpus is None:
            raise HwError(ErrorKind.UNINITIALIZED, "the sim backend is not open; call open() first")
        return self._gpus

    def _set_lost(self, index: int, *, lost: bool) -> str:
        """Mark GPU ``index`` lost or not and return its UUID; persisted first, then adopted, so a
        failed write leaves memory and file agreeing."""
        gpus = self._require_open()
        index = _checked_index(index, len(gpus))
        if gpus[index].lost != lost:
            updated = (*gpus[:index], replace(gpus[index], lost=lost), *gpus[index + 1 :])
            self._save(updated)
            self._gpus = updated
        return gpus[index].uuid

    def _deliver(self, event: HwEvent) -> HwEvent:
        if self._sink is not None:
            self._sink(event)
        return event
