"""The real hardware backend, over NVML through pynvml.

This module and :mod:`gpud.hw.nvml_telemetry` (the scrape-time readings it delegates to) are the
only ones that import pynvml, so a node without the driver (the normal state before
``gpud bootstrap``) never pays for it, and everything NVML-specific — return codes, handles, event
sets — stops here. Above this module a GPU is a :class:`~gpud.hw.types.GpuInfo` and a failure an
:class:`~gpud.hw.errors.HwError`.

A GPU that fell off the bus must not hide the healthy ones: ``gpus()`` lists it with ``lost=True``
and whatever NVML could still tell (or what the previous call saw), and the event thread drops it
from its event set so that the other boards keep reporting XIDs.

MIG goes through NVML too (:class:`gpud.hw.backend.MigBackend`), with one exception: NVML cannot
reset a GPU, so ``reset_gpu`` runs ``nvidia-smi -r`` as NVIDIA's mig-parted does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pynvml

from gpud.hw.backend import DriverSignals, EventSink
from gpud.hw.errors import UNAVAILABLE_ADVICE, BackendUnavailable, ErrorKind, HwError
from gpud.hw.nvml_telemetry import NvmlTelemetry
from gpud.hw.telemetry import GpuReading
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    CiProfile,
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
from gpud.mig.catalog import family_for

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

_MIB = 1024 * 1024

NVIDIA_DRIVER = DriverSignals(module="nvidia", dev_dir=Path("/dev"), control_node="nvidiactl")
"""nvidia.ko's ``/dev/nvidiactl`` (char major 195) is the node every NVML client opens first."""

# Return codes that mean "this board or driver does not have that": an empty answer, not a failure.
_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})

# XID the driver logs for a double-bit ECC error; a DBE event is reported as that XID so the health
# policy above needs to know only XIDs.
XID_DOUBLE_BIT_ECC = 48

# Single-bit ECC errors are corrected and never take a GPU out of service, so listening for them
# would only wake the event thread.
_WANTED_EVENTS = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError

_PciKey = tuple[int, int, int]

# NVML says to enumerate profile enums until INVALID_ARGUMENT; this only bounds a driver that never
# says it (the header's COUNT grows between releases, so it is not used as the limit).
_ENUM_LIMIT = 256

# NVML names MIG profiles "MIG 1g.5gb"; mig-parted configs and the catalog say "1g.5gb".
_MIG_NAME_PREFIX = "MIG "

# nvidia-smi(1), RETURN VALUE: a failing nvidia-smi exits with the NVML return code of what failed
# for these; anything else (255: "other error") is UNKNOWN.
_SMI_EXIT_KINDS = frozenset(
    {
        ErrorKind.INVALID_ARGUMENT,
        ErrorKind.NOT_SUPPORTED,
        ErrorKind.NO_PERMISSION,
        ErrorKind.NOT_FOUND,
        ErrorKind.DRIVER_NOT_LOADED,
        ErrorKind.LIBRARY_NOT_FOUND,
        ErrorKind.FUNCTION_NOT_FOUND,
        ErrorKind.GPU_IS_LOST,
    }
)

CommandRunner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]
"""Runs a command (argv, timeout in seconds) and returns its exit status and output; injectable so
tests can record the reset command instead of resetting a GPU."""


def run_command(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` without a shell, capturing stdout and stderr as text."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


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


def _find_gpu_instance(where: str, handle: Any, gi_id: int) -> Any:
    """The NVML handle of GPU instance ``gi_id`` (NOT_FOUND when it does not exist)."""
    return _required(
        f"{where}: find GPU instance {gi_id}", pynvml.nvmlDeviceGetGpuInstanceById, handle, gi_id
    )


def _handle_key(handle: Any) -> int | None:
    """Handles are opaque pointers; their address identifies the device in event data."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def _bus_id(pci: Any) -> str:
    raw = pci.busId.decode(errors="replace") if isinstance(pci.busId, bytes) else str(pci.busId)
    if raw:
        return raw.upper()
    return pynvml.NVML_DEVICE_PCI_BUS_ID_FMT % (pci.domain, pci.bus, pci.device)


def _kind_of(code: int) -> ErrorKind:
    try:
        return ErrorKind(code)
    except ValueError:
        return ErrorKind.UNKNOWN


def _mig_state(modes: list[int] | None) -> MigState:
    if modes is None:
        return MIG_UNSUPPORTED

    def mode(value: int) -> MigMode:
        return MigMode.ENABLED if value == pynvml.NVML_DEVICE_MIG_ENABLE else MigMode.DISABLED

    return MigState(mode(modes[0]), mode(modes[1]))


# ---- MIG reading helpers ------------------------------------------------------------------------


def _profile_name(raw: bytes | str) -> str:
    """A profile name as mig-parted writes it: NVML's "MIG 1g.5gb" without the prefix."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return text.removeprefix(_MIG_NAME_PREFIX)


def _enumerate_profiles(what: str, read: Callable[[int], T]) -> list[T]:
    """NVML's enumeration rule for profile enums: ask 0, 1, ... until INVALID_ARGUMENT (past the
    driver's last enum); NOT_SUPPORTED means this board lacks that one (or MIG is off)."""
    found: list[T] = []
    for enum in range(_ENUM_LIMIT):
        try:
            found.append(read(enum))
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                break
            if err.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                continue
            raise to_hw_error(err, f"{what} {enum}") from err
    return found


def _gi_profile_infos(where: str, handle: Any) -> list[Any]:
    """Every GPU-instance profile NVML describes, looked up by enum (the v2 struct has the name)."""
    return _enumerate_profiles(
        f"{where}: read GPU instance profile enum",
        lambda enum: pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, enum, 2),
    )


def _placements(where: str, handle: Any, profile_id: int) -> tuple[Placement, ...]:
    """Where NVML lets a GI of ``profile_id`` (the device profile ID) sit; asks the count first."""
    what = f"{where}: read placements of GPU instance profile {profile_id}"
    count = ctypes.c_uint(0)
    read = pynvml.nvmlDeviceGetGpuInstancePossiblePlacements
    _required(what, read, handle, profile_id, None, ctypes.byref(count))
    if not count.value:
        return ()
    array = (pynvml.c_nvmlGpuInstancePlacement_t * count.value)()
    _required(what, read, handle, profile_id, array, ctypes.byref(count))
    return tuple(Placement(p.start, p.size) for p in array[: count.value])


def _ci_profiles(where: str, gi_handle: Any) -> tuple[CiProfile, ...]:
    """The compute-instance profiles of one GI; NVML answers these only for an existing GI."""
    infos = _enumerate_profiles(
        f"{where}: read compute instance profile enum",
        lambda enum: pynvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
            gi_handle, enum, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, 2
        ),
    )
    profiles = (
        CiProfile(
            profile_id=info.id,
            slices=info.sliceCount,
            max_count=info.instanceCount,
            name=_profile_name(info.name),
        )
        for info in infos
    )
    return tuple(sorted(profiles, key=lambda c: (c.slices, c.profile_id)))


def _gpu_instance(where: str, gi_handle: Any) -> GpuInstance:
    info = _required(f"{where}: read GPU instance", pynvml.nvmlGpuInstanceGetInfo, gi_handle)
    placement = Placement(info.placement.start, info.placement.size)
    return GpuInstance(gi_id=info.id, profile_id=info.profileId, placement=placement)


def _gpu_instances(where: str, handle: Any, profile_id: int, max_count: int) -> list[Any]:
    """Handles of the GIs of one profile; the array is sized by the profile's instance count, as
    the header asks."""
    if max_count <= 0:
        return []
    array = (pynvml.c_nvmlGpuInstance_t * max_count)()
    count = ctypes.c_uint(0)
    _required(
        f"{where}: list GPU instances of profile {profile_id}",
        pynvml.nvmlDeviceGetGpuInstances,
        handle,
        profile_id,
        array,
        ctypes.byref(count),
    )
    return list(array[: count.value])


def _compute_instances(
    where: str,
    gi_handle: Any,
    gi_id: int,
    profiles: tuple[CiProfile, ...],
    uuids: dict[tuple[int, int], str],
) -> tuple[ComputeInstance, ...]:
    found: list[ComputeInstance] = []
    for profile in profiles:
        if profile.max_count <= 0:
            continue
        array = (pynvml.c_nvmlComputeInstance_t * profile.max_count)()
        count = ctypes.c_uint(0)
        _required(
            f"{where}: list compute instances of profile {profile.profile_id} in GPU instance "
            f"{gi_id}",
            pynvml.nvmlGpuInstanceGetComputeInstances,
            gi_handle,
            profile.profile_id,
            array,
            ctypes.byref(count),
        )
        for ci_handle in array[: count.value]:
            info = _required(
                f"{where}: read compute instance of GPU instance {gi_id}",
                pynvml.nvmlComputeInstanceGetInfo,
                ci_handle,
            )
            found.append(
                ComputeInstance(
                    ci_id=info.id,
                    profile_id=info.profileId,
                    slices=profile.slices or info.placement.size,
                    start=info.placement.start,
                    mig_uuid=_uuid_of(where, uuids, gi_id, info.id),
                )
            )
    return tuple(sorted(found, key=lambda c: c.ci_id))


def _uuid_of(where: str, uuids: dict[tuple[int, int], str], gi_id: int, ci_id: int) -> str:
    uuid = uuids.get((gi_id, ci_id))
    if uuid is None:
        # Every CI is a MIG device; a missing one means the driver has not published it yet.
        log.warning(
            "%s: no MIG device for GPU instance %d, compute instance %d", where, gi_id, ci_id
        )
        return ""
    return uuid


@dataclass(frozen=True)
class _MigDevice:
    """A MIG device handle with the (GI, CI) it is and its UUID."""

    handle: Any
    gi_id: int
    ci_id: int
    uuid: str


def _mig_devices(where: str, handle: Any) -> list[_MigDevice]:
    """The MIG devices under a GPU; an index without one answers NOT_FOUND and is skipped."""
    slots = _nvml(
        f"{where}: count MIG devices",
        pynvml.nvmlDeviceGetMaxMigDeviceCount,
        handle,
        absent=_ABSENT,
        default=0,
    )
    devices: list[_MigDevice] = []
    for slot in range(slots or 0):
        what = f"{where}: MIG device {slot}"
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_NOT_FOUND:
                continue
            raise to_hw_error(err, f"{what}: get handle") from err
        devices.append(
            _MigDevice(
                handle=mig,
                gi_id=_required(
                    f"{what}: read GPU instance ID", pynvml.nvmlDeviceGetGpuInstanceId, mig
                ),
                ci_id=_required(
                    f"{what}: read compute instance ID", pynvml.nvmlDeviceGetComputeInstanceId, mig
                ),
                uuid=_required(f"{what}: read UUID", pynvml.nvmlDeviceGetUUID, mig),
            )
        )
    return devices


def _running(what: str, handle: Any) -> list[Any]:
    """Compute processes on a GPU or MIG device handle; NOT_SUPPORTED means none can be listed."""
    try:
        return pynvml.nvmlDeviceGetComputeRunningProcesses_v3(handle)
    except pynvml.NVMLError as err:
        if err.value == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:  # a driver older than _v3
            return (
                _nvml(what, pynvml.nvmlDeviceGetComputeRunningProcesses_v2, handle, absent=_ABSENT)
                or []
            )
        if err.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
            return []
        raise to_hw_error(err, what) from err


def _process(info: Any, mig_uuid: str | None) -> GpuProcess:
    used = info.usedGpuMemory  # None where the driver cannot tell (WDDM)
    return GpuProcess(pid=info.pid, mig_uuid=mig_uuid, used_memory_mib=(used or 0) // _MIB)


def _activation_error(where: str, enabled: bool, status: int) -> HwError:
    """nvmlDeviceSetMigMode succeeded but could not activate the mode: it stays pending."""
    target = "enabled" if enabled else "disabled"
    if status == pynvml.NVML_ERROR_IN_USE:
        return HwError(
            ErrorKind.IN_USE,
            f"{where}: MIG mode stays pending ({target}): the GPU is in use; stop what holds it "
            "(CUDA processes, nvidia-persistenced, DCGM, monitoring agents) and reset the GPU",
        )
    if status == pynvml.NVML_ERROR_RESET_REQUIRED:
        return HwError(
            ErrorKind.RESET_REQUIRED,
            f"{where}: MIG mode stays pending ({target}) until a GPU reset this platform does not "
            "allow from here (a pass-through VM); reboot the VM",
        )
    return HwError(
        _kind_of(status),
        f"{where}: MIG mode {target} was not activated: {pynvml.NVMLError(status)}",
    )


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
    compute_capability: tuple[int, int] | None = None
    direct_links: dict[_PciKey, int] = field(default_factory=dict)
    switch_links: int = 0
    lost: bool = False


def _changes_layout(
    method: Callable[Concatenate[NvmlBackend, int, P], T],
) -> Callable[Concatenate[NvmlBackend, int, P], T]:
    """A MIG call on GPU ``index``: telemetry forgets that GPU's handles, MIG devices and GPM
    samples before and after it, so no read in between keeps what the call changed."""

    @functools.wraps(method)
    def call(self: NvmlBackend, index: int, *args: P.args, **kwargs: P.kwargs) -> T:
        self._telemetry.invalidate(index)
        try:
            return method(self, index, *args, **kwargs)
        finally:
            self._telemetry.invalidate(index)

    return call


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
    ``command_runner`` runs ``nvidia-smi -r`` for :meth:`reset_gpu` (the only command this backend
    runs), within ``reset_timeout_s``. ``driver`` is where the daemon looks for the driver to
    appear when :meth:`open` found none; :meth:`open` may simply be called again then, because
    pynvml retries loading the library and NVML may be initialised again after a failed init.
    """

    name = "nvml"

    def __init__(
        self,
        *,
        event_wait_ms: int = 1000,
        retry_s: float = 1.0,
        command_runner: CommandRunner = run_command,
        reset_timeout_s: float = 120.0,
        driver: DriverSignals = NVIDIA_DRIVER,
    ) -> None:
        self.driver = driver
        self._event_wait_ms = event_wait_ms
        self._retry_s = retry_s
        self._run = command_runner
        self._reset_timeout_s = reset_timeout_s
        self._open = False
        self._released_for: str | None = None  # set while NVML is let go for a GPU reset
        self._lock = threading.Lock()
        # Last answer of gpus(), by index: what a board said before it was lost.
        self._last: dict[int, GpuInfo] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sink: EventSink | None = None
        self._event_set: Any = None
        self._watched: dict[int, _Watched] = {}
        self._reported_lost: set[str] = set()
        self._telemetry = NvmlTelemetry(lambda index: self._uuid_for(_Board(index)))

    # ---- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        if self._open:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            kind = _kind_of(err.value)
            message = UNAVAILABLE_ADVICE.get(kind)
            if message is not None:
                raise BackendUnavailable(kind, message) from err
            raise to_hw_error(err, "initialise NVML") from err
        self._telemetry.invalidate()
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
            self._telemetry.release()  # GPM samples are NVML's memory: freed before shutdown
            self._open = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as err:
                log.warning("nvmlShutdown failed: %s", err)

    def _require_open(self) -> None:
        if not self._open:
            if self._released_for is not None:
                raise HwError(
                    ErrorKind.UNINITIALIZED, f"NVML is released while {self._released_for} resets"
                )
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
            capability = _nvml(
                f"{where}: read compute capability",
                pynvml.nvmlDeviceGetCudaComputeCapability,
                handle,
                absent=_ABSENT,
            )
            if capability is not None:
                board.compute_capability = (capability[0], capability[1])
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
            compute_capability=board.compute_capability,
        )

    # ---- telemetry -----------------------------------------------------------------------------

    def read_telemetry(self, index: int) -> GpuReading:
        """See :mod:`gpud.hw.nvml_telemetry` for the calls a read makes and what it keeps."""
        self._require_open()
        return self._telemetry.read(index)

    # ---- events --------------------------------------------------------------------------------

    def start_events(self, sink: EventSink) -> None:
        self._start_events(sink, reported_lost=set())

    def _start_events(self, sink: EventSink, reported_lost: set[str]) -> None:
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
        self._reported_lost = reported_lost
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

    # ---- MIG -----------------------------------------------------------------------------------

    def _device(self, index: int) -> tuple[str, Any]:
        """A fresh handle: NVML may re-bind a board when its MIG mode changes or it is reset."""
        self._require_open()
        where = f"GPU {index}"
        return where, _required(f"{where}: get handle", pynvml.nvmlDeviceGetHandleByIndex, index)

    @staticmethod
    def _read_mig_mode(where: str, handle: Any) -> MigState:
        modes = _nvml(
            f"{where}: read MIG mode", pynvml.nvmlDeviceGetMigMode, handle, absent=_ABSENT
        )
        return _mig_state(modes)

    def mig_state(self, index: int) -> MigLayoutState:
        """Mode, profiles and instances of one GPU, read from NVML.

        Two facts NVML cannot give are taken from the catalog (:mod:`gpud.mig.catalog`, by PCI
        device ID), so the planner can check a layout before anything is changed:

        * while MIG is off NVML describes no GPU-instance profile (NOT_SUPPORTED), so the profiles
          are the board family's from the catalog; read the state again once MIG is on, since the
          driver's numbers (memory sizes, names) are the ones that count;
        * compute-instance profiles are only answered for an existing GI, so a GI profile without
          an instance gets its family's CI profiles from the catalog.

        A board the catalog does not know gets no profiles in the first case and no CI profiles
        in the second. Profiles come in ``nvidia-smi mig -lgip`` order (compute slices, memory
        slices, profile ID), which is the catalog's too; GIs by ``gi_id``, CIs by ``ci_id``.
        """
        where, handle = self._device(index)
        # gpud reads the layout again: so does telemetry, at its next read.
        self._telemetry.invalidate()
        uuid = _required(f"{where}: read UUID", pynvml.nvmlDeviceGetUUID, handle)
        pci = _required(f"{where}: read PCI info", pynvml.nvmlDeviceGetPciInfo, handle)
        mode = self._read_mig_mode(where, handle)
        layout = MigLayoutState(index, uuid, pci.pciDeviceId, mode, profiles=(), instances=())
        if not mode.capable:
            return layout
        family = family_for(pci.pciDeviceId)
        known = {p.profile_id: p for p in family.profiles} if family is not None else {}
        infos = _gi_profile_infos(where, handle)
        if not infos:
            if mode.current is MigMode.ENABLED:
                return layout
            return dataclasses.replace(layout, profiles=family.profiles if family else ())

        enabled = mode.current is MigMode.ENABLED
        uuids = {(m.gi_id, m.ci_id): m.uuid for m in _mig_devices(where, handle)} if enabled else {}
        instances: list[GpuInstance] = []
        profiles: list[GiProfile] = []
        for info in infos:
            handles = _gpu_instances(where, handle, info.id, info.instanceCount) if enabled else []
            if handles:
                ci_profiles = _ci_profiles(where, handles[0])
            else:
                fallback = known.get(info.id)
                ci_profiles = fallback.compute_profiles if fallback is not None else ()
            for gi_handle in handles:
                gi = _gpu_instance(where, gi_handle)
                cis = _compute_instances(where, gi_handle, gi.gi_id, ci_profiles, uuids)
                instances.append(dataclasses.replace(gi, compute_instances=cis))
            placements = _placements(where, handle, info.id)
            profiles.append(
                GiProfile(
                    profile_id=info.id,
                    name=_profile_name(info.name),
                    slices=info.sliceCount,
                    memory_slices=placements[0].size if placements else 0,
                    memory_mib=info.memorySizeMB,
                    max_count=info.instanceCount,
                    placements=placements,
                    compute_profiles=ci_profiles,
                )
            )
        return dataclasses.replace(
            layout,
            profiles=tuple(
                sorted(profiles, key=lambda p: (p.slices, p.memory_slices, p.profile_id))
            ),
            instances=tuple(sorted(instances, key=lambda g: g.gi_id)),
        )

    @_changes_layout
    def set_mig_mode(self, index: int, enabled: bool) -> MigState:
        """``nvmlDeviceSetMigMode``, then the mode read back (pending on Ampere until a reset).

        An activation status other than SUCCESS leaves the request pending and raises its kind:
        IN_USE while something holds the board, RESET_REQUIRED where the platform cannot reset it.
        """
        where, handle = self._device(index)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        status = _required(f"{where}: set MIG mode", pynvml.nvmlDeviceSetMigMode, handle, mode)
        if status != pynvml.NVML_SUCCESS:
            raise _activation_error(where, enabled, status)
        where, handle = self._device(index)  # the call may have re-bound the board
        return self._read_mig_mode(where, handle)

    @_changes_layout
    def reset_gpu(self, index: int) -> MigState:
        """Reset the GPU with ``nvidia-smi -r -i <bus id>`` (NVML has no reset call).

        nvidia-smi refuses to reset a board any NVML client holds, gpud included, so NVML is let go
        for the duration (as mig-parted shuts NVML down before its reset): the event thread stops
        and other calls answer UNINITIALIZED until NVML is opened again and events restart. A GPU
        that processes use is refused with IN_USE before anything is let go.
        """
        where, handle = self._device(index)
        pci = _required(f"{where}: read PCI info", pynvml.nvmlDeviceGetPciInfo, handle)
        bus_id = _bus_id(pci)
        users = self.processes(index)
        if users:
            pids = ", ".join(str(p.pid) for p in users)
            raise HwError(
                ErrorKind.IN_USE, f"{where}: cannot reset: process(es) {pids} use it; stop them"
            )
        sink = self._sink if self._thread is not None else None
        reported = set(self._reported_lost)
        self.close()
        self._released_for = where
        try:
            self._run_reset(where, bus_id)
        finally:
            self._released_for = None
            self.open()
            if sink is not None:
                self._start_events(sink, reported_lost=reported)
        where, handle = self._device(index)
        return self._read_mig_mode(where, handle)

    def _run_reset(self, where: str, bus_id: str) -> None:
        argv = ["nvidia-smi", "-r", "-i", bus_id]
        command = " ".join(argv)
        try:
            done = self._run(argv, self._reset_timeout_s)
        except FileNotFoundError as err:
            raise HwError(
                ErrorKind.NOT_FOUND,
                f"{where}: cannot reset: nvidia-smi not found; install the NVIDIA driver's "
                "utilities (nvidia-utils-<driver version>)",
            ) from err
        except subprocess.TimeoutExpired as err:
            raise HwError(
                ErrorKind.TIMEOUT,
                f"{where}: `{command}` did not finish within {self._reset_timeout_s:g} s",
            ) from err
        except OSError as err:
            kind = (
                ErrorKind.NO_PERMISSION
                if isinstance(err, PermissionError)
                else ErrorKind.OPERATING_SYSTEM
            )
            raise HwError(kind, f"{where}: cannot run `{command}`: {err}") from err
        if done.returncode != 0:
            kind = _kind_of(done.returncode)
            output = (done.stderr or "").strip() or (done.stdout or "").strip() or "no output"
            raise HwError(
                kind if kind in _SMI_EXIT_KINDS else ErrorKind.UNKNOWN,
                f"{where}: `{command}` failed (exit status {done.returncode}): {output}",
            )

    @_changes_layout
    def create_gpu_instance(self, index: int, profile_id: int, placement: Placement) -> GpuInstance:
        """``nvmlDeviceCreateGpuInstanceWithPlacement``; ``profile_id`` is the device profile ID."""
        where, handle = self._device(index)
        want = pynvml.c_nvmlGpuInstancePlacement_t(placement.start, placement.size)
        gi = _required(
            f"{where}: create GPU instance of profile {profile_id} at {placement}",
            pynvml.nvmlDeviceCreateGpuInstanceWithPlacement,
            handle,
            profile_id,
            ctypes.byref(want),
        )
        return _gpu_instance(where, gi)

    @_changes_layout
    def create_compute_instance(
        self, index: int, gi_id: int, ci_profile_id: int
    ) -> ComputeInstance:
        """``nvmlGpuInstanceCreateComputeInstance``; ``ci_profile_id`` is the CI profile's
        ``info.id``. The driver places the CI; its MIG device UUID is read back."""
        where, handle = self._device(index)
        gi = _find_gpu_instance(where, handle, gi_id)
        ci = _required(
            f"{where}: create compute instance of profile {ci_profile_id} in GPU instance {gi_id}",
            pynvml.nvmlGpuInstanceCreateComputeInstance,
            gi,
            ci_profile_id,
        )
        info = _required(
            f"{where}: read compute instance of GPU instance {gi_id}",
            pynvml.nvmlComputeInstanceGetInfo,
            ci,
        )
        slices = next(
            (p.slices for p in _ci_profiles(where, gi) if p.profile_id == info.profileId),
            info.placement.size,
        )
        uuids = {(m.gi_id, m.ci_id): m.uuid for m in _mig_devices(where, handle)}
        return ComputeInstance(
            ci_id=info.id,
            profile_id=info.profileId,
            slices=slices,
            start=info.placement.start,
            mig_uuid=_uuid_of(where, uuids, gi_id, info.id),
        )

    @_changes_layout
    def destroy_compute_instance(self, index: int, gi_id: int, ci_id: int) -> None:
        where, handle = self._device(index)
        gi = _find_gpu_instance(where, handle, gi_id)
        what = f"{where}: compute instance {ci_id} of GPU instance {gi_id}"
        ci = _required(f"{what}: find", pynvml.nvmlGpuInstanceGetComputeInstanceById, gi, ci_id)
        _required(f"{what}: destroy", pynvml.nvmlComputeInstanceDestroy, ci)

    @_changes_layout
    def destroy_gpu_instance(self, index: int, gi_id: int) -> None:
        where, handle = self._device(index)
        what = f"{where}: GPU instance {gi_id}"
        gi = _find_gpu_instance(where, handle, gi_id)
        _required(f"{what}: destroy", pynvml.nvmlGpuInstanceDestroy, gi)

    def processes(self, index: int) -> tuple[GpuProcess, ...]:
        """Compute processes on the GPU and on each of its MIG devices.

        In MIG mode the GPU handle answers the aggregate (each process tagged with its GI and CI
        IDs) and each MIG device handle its own; both are asked, and a process is listed once per
        device it runs on, with the MIG device's own numbers where it reports them.
        """
        where, handle = self._device(index)
        devices = _mig_devices(where, handle)
        by_ids = {(d.gi_id, d.ci_id): d.uuid for d in devices}
        found: dict[tuple[int, str | None], GpuProcess] = {}
        for info in _running(f"{where}: list compute processes", handle):
            uuid = by_ids.get((info.gpuInstanceId, info.computeInstanceId))
            found[(info.pid, uuid)] = _process(info, uuid)
        for device in devices:
            for info in _running(
                f"{where}: list compute processes on {device.uuid}", device.handle
            ):
                found[(info.pid, device.uuid)] = _process(info, device.uuid)
        return tuple(sorted(found.values(), key=lambda p: (p.pid, p.mig_uuid or "")))
