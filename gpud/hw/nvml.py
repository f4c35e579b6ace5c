"""The real hardware backend, over NVML through pynvml.

This is the only module that imports pynvml, so a node without the driver (the normal state before
``gpud bootstrap``) never pays for it, and everything NVML-specific — return codes, handles, event
sets — stops here. Above this module a GPU is a :class:`~gpud.hw.types.GpuInfo` and a failure an
:class:`~gpud.hw.errors.HwError`.

A GPU that fell off the bus must not hide the healthy ones: ``gpus()`` lists it with ``lost=True``
and whatever NVML could still tell (or what the previous call saw), and the event thread drops it
from its event set so that the other boards keep reporting XIDs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pynvml

from gpud.hw.backend import EventSink
from gpud.hw.errors import BackendUnavailable, ErrorKind, HwError
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    EventKind,
    GpuInfo,
    HwEvent,
    MigMode,
    MigState,
    NvLinkPeer,
    SystemInfo,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIB = 1024 * 1024

# The init failures that mean "this node cannot use NVML at all", with what the operator should do.
_UNAVAILABLE: dict[int, str] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "no NVIDIA driver: libnvidia-ml.so.1 not found; install the driver "
        "(sudo ubuntu-drivers install --gpgpu) or run with --simulate"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (
        "NVIDIA driver not loaded: libnvidia-ml.so.1 is installed but the nvidia kernel module is "
        "not running; load it (modprobe nvidia) or reboot after installing the driver, and read "
        "`dmesg | grep -i nvrm` if that fails"
    ),
    pynvml.NVML_ERROR_NO_PERMISSION: (
        "no permission to use the NVIDIA driver (/dev/nvidiactl could not be opened); "
        "run gpud as root"
    ),
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "NVIDIA driver version mismatch: libnvidia-ml.so.1 and the loaded kernel module come from "
        "different driver versions (usually a driver upgrade without a reboot); reboot the node"
    ),
}

# Return codes that mean "this board or driver does not have that": an empty answer, not a failure.
_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})

# XID the driver logs for a double-bit ECC error; a DBE event is reported as that XID so the health
# policy above needs to know only XIDs.
XID_DOUBLE_BIT_ECC = 48

# Single-bit ECC errors are corrected and never take a GPU out of service, so listening for them
# would only wake the event thread.
_WANTED_EVENTS = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError

_PciKey = tuple[int, int, int]


def to_hw_error(err: pynvml.NVMLError, what: str) -> HwError:
    """The one translation from pynvml's exception to ours; ErrorKind values are NVML's codes."""
    code = getattr(err, "value", pynvml.NVML_ERROR_UNKNOWN)
    try:
        kind = ErrorKind(code)
    except ValueError:
        kind = ErrorKind.UNKNOWN
    return HwError(kind, f"{what}: {err}")


def lost_uuid(index: int) -> str:
    """Stand-in UUID for a GPU lost before gpud ever read its UUID.

    Derived from the index alone so that every call (``gpus()`` and the event thread) names the
    board the same way until NVML can read it again, which only happens after a reset or reboot.
    """
    return f"GPU-LOST-{index}"


def format_cuda_version(version: int) -> str:
    """NVML's integer CUDA version (1000 * major + 10 * minor) as CUDA writes it: 12040 -> 12.4."""
    if version <= 0:
        return ""
    return f"{version // 1000}.{version % 1000 // 10}"


def _nvml(
    what: str,
    fn: Callable[..., T],
    *args: Any,
    absent: Iterable[int] = (),
    default: T | None = None,
) -> T | None:
    """Call pynvml; codes in ``absent`` give ``default``, anything else becomes an HwError."""
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        if err.value in absent:
            return default
        raise to_hw_error(err, what) from err


def _required(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        raise to_hw_error(err, what) from err


def _handle_key(handle: Any) -> int | None:
    """Handles are opaque pointers; their address identifies the device in event data."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def _bus_id(pci: Any) -> str:
    raw = pci.busId.decode(errors="replace") if isinstance(pci.busId, bytes) else str(pci.busId)
    if raw:
        return raw.upper()
    return pynvml.NVML_DEVICE_PCI_BUS_ID_FMT % (pci.domain, pci.bus, pci.device)


def _mig_state(modes: list[int] | None) -> MigState:
    if modes is None:
        return MIG_UNSUPPORTED

    def mode(value: int) -> MigMode:
        return MigMode.ENABLED if value == pynvml.NVML_DEVICE_MIG_ENABLE else MigMode.DISABLED

    return MigState(mode(modes[0]), mode(modes[1]))


@dataclass
class _Board:
    """What one pass over a GPU learned; fields stay at their defaults when the GPU got lost."""

    index: int
    handle: Any = None
    uuid: str | None = None
    name: str = ""
    bus_id: str = ""
    pci_key: _PciKey | None = None
    pci_device_id: int = 0
    memory_mib: int = 0
    minor: int = -1
    numa: int | None = None
    mig: MigState = MIG_UNSUPPORTED
    direct_links: dict[_PciKey, int] = field(default_factory=dict)
    switch_links: int = 0
    lost: bool = False


@dataclass(frozen=True)
class _Watched:
    """A GPU registered in the event set: its handle, UUID, and the event mask it accepted."""

    handle: Any
    uuid: str
    mask: int


class NvmlBackend:
    """:class:`gpud.hw.backend.Backend` over the NVIDIA driver.

    ``event_wait_ms`` bounds each ``nvmlEventSetWait`` so ``close()`` can stop the event thread
    within that time (NVML cannot interrupt a wait); it is also the idle wake-up interval.
    """

    name = "nvml"

    def __init__(self, *, event_wait_ms: int = 1000, retry_s: float = 1.0) -> None:
        self._event_wait_ms = event_wait_ms
        self._retry_s = retry_s
        self._open = False
        self._lock = threading.Lock()
        # Last answer of gpus(), by index: what a board said before it was lost.
        self._last: dict[int, GpuInfo] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sink: EventSink | None = None
        self._event_set: Any = None
        self._watched: dict[int, _Watched] = {}
        self._reported_lost: set[str] = set()

    # ---- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        if self._open:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            message = _UNAVAILABLE.get(err.value)
            if message is not None:
                raise BackendUnavailable(ErrorKind(err.value), message) from err
            raise to_hw_error(err, "initialise NVML") from err
        self._open = True

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=self._event_wait_ms / 1000 + 2.0)
            if thread.is_alive():
                # Freeing a set another thread waits on is undefined in NVML: leak it instead.
                log.warning("NVML event thread did not stop; leaving its event set allocated")
            elif self._event_set is not None:
                self._free_set(self._event_set)
            self._event_set = None
            self._watched = {}
        if self._open:
            self._open = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as err:
                log.warning("nvmlShutdown failed: %s", err)

    def _require_open(self) -> None:
        if not self._open:
            raise HwError(ErrorKind.UNINITIALIZED, "the NVML backend is not open")

    # ---- facts ---------------------------------------------------------------------------------

    def system(self) -> SystemInfo:
        self._require_open()
        driver = _nvml("read the driver version", pynvml.nvmlSystemGetDriverVersion, absent=_ABSENT)
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:  # older than the _v2 entry point
                cuda = _nvml(
                    "read the CUDA driver version",
                    pynvml.nvmlSystemGetCudaDriverVersion,
                    absent=_ABSENT,
                )
            elif err.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                cuda = 0
            else:
                raise to_hw_error(err, "read the CUDA driver version") from err
        nvml_version = _nvml(
            "read the NVML version", pynvml.nvmlSystemGetNVMLVersion, absent=_ABSENT
        )
        return SystemInfo(
            backend=self.name,
            driver_version=driver or "",
            cuda_version=format_cuda_version(cuda or 0),
            nvml_version=nvml_version or "",
        )

    def gpus(self) -> list[GpuInfo]:
        self._require_open()
        count = _required("count GPUs", pynvml.nvmlDeviceGetCount)
        boards = [self._read_board(index) for index in range(count)]
        uuids = {board.index: self._uuid_for(board) for board in boards}
        by_pci = {b.pci_key: b.index for b in boards if b.pci_key is not None and not b.lost}
        on_switch = [b for b in boards if b.switch_links and not b.lost]

        infos: list[GpuInfo] = []
        for board in boards:
            links: dict[int, int] = {}
            for key, n in board.direct_links.items():
                peer = by_pci.get(key)
                if peer is not None and peer != board.index:
                    links[peer] = links.get(peer, 0) + n
            if board.switch_links:
                # Through the switch fabric a pair gets as many links as the less-connected side.
                for other in on_switch:
                    if other.index != board.index:
                        n = min(board.switch_links, other.switch_links)
                        links[other.index] = links.get(other.index, 0) + n
            peers = tuple(NvLinkPeer(uuids[i], n) for i, n in sorted(links.items()))
            infos.append(self._to_info(board, uuids[board.index], peers))
        with self._lock:
            self._last = {info.index: info for info in infos}
        return infos

    def _read_board(self, index: int) -> _Board:
        """Read one GPU; GPU_IS_LOST at any step ends the read and marks the board lost."""
        board = _Board(index)
        where = f"GPU {index}"
        try:
            handle = _required(f"{where}: get handle", pynvml.nvmlDeviceGetHandleByIndex, index)
            board.handle = handle
            board.uuid = _required(f"{where}: read UUID", pynvml.nvmlDeviceGetUUID, handle)
            board.name = _required(f"{where}: read name", pynvml.nvmlDeviceGetName, handle)
            pci = _required(f"{where}: read PCI info", pynvml.nvmlDeviceGetPciInfo, handle)
            board.bus_id = _bus_id(pci)
            board.pci_key = (pci.domain, pci.bus, pci.device)
            board.pci_device_id = pci.pciDeviceId
            memory = _nvml(
                f"{where}: read memory", pynvml.nvmlDeviceGetMemoryInfo, handle, absent=_ABSENT
            )
            board.memory_mib = memory.total // _MIB if memory is not None else 0
            board.minor = _required(
                f"{where}: read minor number", pynvml.nvmlDeviceGetMinorNumber, handle
            )
            board.numa = self._numa_node(where, handle)
            board.mig = _mig_state(
                _nvml(
                    f"{where}: read MIG mode", pynvml.nvmlDeviceGetMigMode, handle, absent=_ABSENT
                )
            )
            board.direct_links, board.switch_links = self._read_nvlinks(where, handle)
        except HwError as err:
            if err.kind is not ErrorKind.GPU_IS_LOST:
                raise
            log.warning("%s is lost (NVML answered GPU_IS_LOST); listing it as lost", where)
            board.lost = True
        return board

    @staticmethod
    def _numa_node(where: str, handle: Any) -> int | None:
        read = getattr(pynvml, "nvmlDeviceGetNumaNodeId", None)  # absent from older pynvml
        if read is None:
            return None
        node = _nvml(f"{where}: read NUMA node", read, handle, absent=_ABSENT)
        # The driver answers -1 (as unsigned: 0xFFFFFFFF) when the platform reports no affinity.
        if node is None or node < 0 or node == 0xFFFFFFFF:
            return None
        return node

    @staticmethod
    def _read_nvlinks(where: str, handle: Any) -> tuple[dict[_PciKey, int], int]:
        """Links per remote PCI address for GPU peers, and the number of links into NVSwitches."""
        direct: dict[_PciKey, int] = {}
        switch_links = 0
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                active = pynvml.nvmlDeviceGetNvLinkState(handle, link)
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND or (
                    link == 0 and err.value == pynvml.NVML_ERROR_NOT_SUPPORTED
                ):
                    break  # no NVLink on this board (or driver): skip the other 35 calls
                if err.value in (
                    pynvml.NVML_ERROR_NOT_SUPPORTED,
                    pynvml.NVML_ERROR_INVALID_ARGUMENT,
                ):
                    continue  # past this board's links, or one link not wired
                raise to_hw_error(err, f"{where}: read NVLink {link} state") from err
            if not active:
                continue
            remote_type = _nvml(
                f"{where}: read NVLink {link} remote type",
                pynvml.nvmlDeviceGetNvLinkRemoteDeviceType,
                handle,
                link,
                absent=_ABSENT,
                default=pynvml.NVML_NVLINK_DEVICE_TYPE_UNKNOWN,
            )
            if remote_type == pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                switch_links += 1
                continue
            pci = _nvml(
                f"{where}: read NVLink {link} remote PCI info",
                pynvml.nvmlDeviceGetNvLinkRemotePciInfo,
                handle,
                link,
                absent=_ABSENT,
            )
            if pci is not None:
                key = (pci.domain, pci.bus, pci.device)
                direct[key] = direct.get(key, 0) + 1
        return direct, switch_links

    def _previous(self, index: int, uuid: str | None) -> GpuInfo | None:
        """The last answer for this index, if it can be the same board."""
        with self._lock:
            prev = self._last.get(index)
        if prev is None or (uuid is not None and prev.uuid != uuid):
            return None
        return prev

    def _uuid_for(self, board: _Board) -> str:
        if board.uuid is not None:
            return board.uuid
        prev = self._previous(board.index, None)
        return prev.uuid if prev is not None else lost_uuid(board.index)

    def _to_info(self, board: _Board, uuid: str, peers: tuple[NvLinkPeer, ...]) -> GpuInfo:
        if board.lost:
            prev = self._previous(board.index, board.uuid)
            if prev is not None:
                return dataclasses.replace(prev, lost=True)
        return GpuInfo(
            index=board.index,
            uuid=uuid,
            name=board.name,
            pci_bus_id=board.bus_id,
            pci_device_id=board.pci_device_id,
            memory_mib=board.memory_mib,
            minor_number=board.minor,
            numa_node=board.numa,
            mig=board.mig,
            nvlink_peers=() if board.lost else peers,
            lost=board.lost,
        )

    # ---- events --------------------------------------------------------------------------------

    def start_events(self, sink: EventSink) -> None:
        self._require_open()
        if self._thread is not None:
            raise RuntimeError("NVML events already started")
        event_set = _required("create an NVML event set", pynvml.nvmlEventSetCreate)
        candidates: list[tuple[Any, str, int]] = []
        lost: list[str] = []
        count = _required("count GPUs", pynvml.nvmlDeviceGetCount)
        for index in range(count):
            try:
                handle = _required(
                    f"GPU {index}: get handle", pynvml.nvmlDeviceGetHandleByIndex, index
                )
                uuid = _required(f"GPU {index}: read UUID", pynvml.nvmlDeviceGetUUID, handle)
            except HwError as err:
                if err.kind is ErrorKind.GPU_IS_LOST:
                    lost.append(self._uuid_for(_Board(index)))
                    continue
                self._free_set(event_set)
                raise
            candidates.append((handle, uuid, _WANTED_EVENTS))
        watched, lost_now = self._register(event_set, candidates, negotiate=True)
        self._event_set = event_set
        self._watched = watched
        self._sink = sink
        self._reported_lost = set()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._event_loop,
            args=(lost + lost_now,),
            name="gpud-nvml-events",
            daemon=True,
        )
        self._thread.start()

    def _register(
        self, event_set: Any, candidates: list[tuple[Any, str, int]], *, negotiate: bool
    ) -> tuple[dict[int, _Watched], list[str]]:
        """Register each GPU in ``event_set``; returns the watched GPUs and the UUIDs found lost.

        A GPU that cannot be registered is skipped with a warning rather than failing the rest:
        it simply gets no event-driven health, as with NVIDIA's own device plugin.
        """
        watched: dict[int, _Watched] = {}
        lost: list[str] = []
        for handle, uuid, wanted in candidates:
            try:
                mask = wanted
                if negotiate:
                    supported = pynvml.nvmlDeviceGetSupportedEventTypes(handle)
                    mask = wanted & supported
                    if not mask & pynvml.nvmlEventTypeXidCriticalError:
                        log.warning("GPU %s does not report XID events; no XID health for it", uuid)
                    if not mask:
                        continue
                pynvml.nvmlDeviceRegisterEvents(handle, mask, event_set)
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                    lost.append(uuid)
                else:
                    log.warning(
                        "GPU %s: cannot register for NVML events (%s); no XID health for it",
                        uuid,
                        err,
                    )
                continue
            key = _handle_key(handle)
            if key is not None:
                watched[key] = _Watched(handle, uuid, mask)
        return watched, lost

    @staticmethod
    def _free_set(event_set: Any) -> None:
        try:
            pynvml.nvmlEventSetFree(event_set)
        except pynvml.NVMLError as err:
            log.warning("nvmlEventSetFree failed: %s", err)

    def _event_loop(self, lost_at_start: list[str]) -> None:
        for uuid in lost_at_start:
            self._report_lost(uuid)
        while not self._stop.is_set():
            try:
                self._wait_once()
            except Exception:
                # Whatever went wrong, the thread must survive: it is the only source of health.
                log.exception("NVML event thread error; retrying")
                self._stop.wait(self._retry_s)

    def _wait_once(self) -> None:
        try:
            data = pynvml.nvmlEventSetWait_v2(self._event_set, self._event_wait_ms)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_TIMEOUT:
                return
            if err.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                self._on_gpu_lost()
                return
            log.warning("nvmlEventSetWait failed: %s; retrying", err)
            self._stop.wait(self._retry_s)
            return
        event = self._translate(data)
        if event is not None:
            self._emit(event)

    def _translate(self, data: Any) -> HwEvent | None:
        key = _handle_key(data.device)
        watched = self._watched.get(key) if key is not None else None
        if watched is not None:
            uuid = watched.uuid
        else:
            try:
                uuid = pynvml.nvmlDeviceGetUUID(data.device)
            except pynvml.NVMLError as err:
                log.warning("NVML event for an unknown device dropped: %s", err)
                return None
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        if data.eventType == pynvml.nvmlEventTypeXidCriticalError:
            return HwEvent(EventKind.XID, uuid, xid=int(data.eventData), gi_id=gi, ci_id=ci)
        if data.eventType == pynvml.nvmlEventTypeDoubleBitEccError:
            return HwEvent(
                EventKind.XID,
                uuid,
                xid=XID_DOUBLE_BIT_ECC,
                gi_id=gi,
                ci_id=ci,
                detail="double-bit ECC error event",
            )
        return None

    @staticmethod
    def _is_lost(handle: Any) -> bool:
        """Ask the board something only live hardware answers (static facts may be cached)."""
        try:
            pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError as err:
            return err.value == pynvml.NVML_ERROR_GPU_IS_LOST
        return False

    def _on_gpu_lost(self) -> None:
        """Report the lost boards and rebuild the event set without them.

        NVML does not say which device a failed wait was about, and a set holding a lost board
        may keep failing, which would leave every other GPU without XID events.
        """
        lost = [w for w in self._watched.values() if self._is_lost(w.handle)]
        if not lost:
            log.warning("nvmlEventSetWait answered GPU_IS_LOST but every watched GPU answers")
            self._stop.wait(self._retry_s)
            return
        for watched in lost:
            self._report_lost(watched.uuid)
        keep = [(w.handle, w.uuid, w.mask) for w in self._watched.values() if w not in lost]
        try:
            new_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            log.warning("cannot rebuild the NVML event set: %s; retrying", err)
            self._stop.wait(self._retry_s)
            return
        watched, lost_now = self._register(new_set, keep, negotiate=False)
        for uuid in lost_now:
            self._report_lost(uuid)
        old, self._event_set, self._watched = self._event_set, new_set, watched
        self._free_set(old)

    def _report_lost(self, uuid: str) -> None:
        if uuid in self._reported_lost:
            return
        self._reported_lost.add(uuid)
        self._emit(HwEvent(EventKind.GPU_LOST, uuid, detail="NVML answered GPU_IS_LOST"))

    def _emit(self, event: HwEvent) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            sink(event)
        except Exception:
            log.exception("event sink failed on %s", event)
