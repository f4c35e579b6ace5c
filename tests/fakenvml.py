"""A fake ``libnvidia-ml.so.1`` for testing the NVML backend below pynvml.

The fake replaces ``pynvml.nvmlLib``; every NVML entry point it offers is a ctypes callback with
the C signature from ``nvml.h``, so pynvml's own marshalling (``byref`` out-parameters, structures,
``char`` buffers, return code -> ``NVMLError`` subclass) runs exactly as against the real library.
Out-parameters are written through raw addresses with structures declared here from ``nvml.h``
rather than pynvml's classes, so a layout mismatch between the two would show up as wrong values.

Behaviour follows NVML's documentation where it says something (calls before ``nvmlInit`` answer
``UNINITIALIZED``; too-small buffers ``INSUFFICIENT_SIZE``; a link index past the device's links
``INVALID_ARGUMENT``; registering an event type the device lacks ``NOT_SUPPORTED``; a GPU that fell
off the bus answers ``GPU_IS_LOST`` to every query, including ``nvmlDeviceGetHandleByIndex`` when
configured so). Where NVML is silent the fake takes the strictest reading and says so:

* ``nvmlEventSetWait_v2`` keeps answering ``GPU_IS_LOST`` for as long as a lost GPU is registered in
  the set, so a backend has to drop the lost board from its set to hear the others again.
* Events for a device or event type that was not registered in the waited-on set are discarded,
  as the driver never delivers them.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml

c_int, c_uint, c_ulonglong, c_void_p, c_char = (
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_ulonglong,
    ctypes.c_void_p,
    ctypes.c_char,
)


class Ret(enum.IntEnum):
    """``nvmlReturn_t`` values (nvml.h)."""

    SUCCESS = 0
    UNINITIALIZED = 1
    INVALID_ARGUMENT = 2
    NOT_SUPPORTED = 3
    NO_PERMISSION = 4
    ALREADY_INITIALIZED = 5
    NOT_FOUND = 6
    INSUFFICIENT_SIZE = 7
    DRIVER_NOT_LOADED = 9
    TIMEOUT = 10
    LIBRARY_NOT_FOUND = 12
    FUNCTION_NOT_FOUND = 13
    GPU_IS_LOST = 15
    LIB_RM_VERSION_MISMATCH = 18
    UNKNOWN = 999


# nvmlEventType* bits (nvml.h).
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_PSTATE = 0x4
EVENT_XID = 0x8
EVENT_CLOCK = 0x10
ALL_EVENTS = EVENT_SINGLE_BIT_ECC | EVENT_DOUBLE_BIT_ECC | EVENT_PSTATE | EVENT_XID | EVENT_CLOCK

NVLINK_DEVICE_TYPE_GPU = 0x00
NVLINK_DEVICE_TYPE_SWITCH = 0x02

NO_INSTANCE = 0xFFFFFFFF


# Structures as nvml.h declares them (not pynvml's classes, on purpose: see module docstring).
class PciInfo(ctypes.Structure):
    _fields_ = [
        ("busIdLegacy", c_char * 16),
        ("domain", c_uint),
        ("bus", c_uint),
        ("device", c_uint),
        ("pciDeviceId", c_uint),
        ("pciSubSystemId", c_uint),
        ("busId", c_char * 32),
    ]


class Memory(ctypes.Structure):
    _fields_ = [
        ("total", c_ulonglong),
        ("free", c_ulonglong),
        ("used", c_ulonglong),
    ]


class EventData(ctypes.Structure):
    _fields_ = [
        ("device", c_void_p),
        ("eventType", c_ulonglong),
        ("eventData", c_ulonglong),
        ("gpuInstanceId", c_uint),
        ("computeInstanceId", c_uint),
    ]


@dataclass
class FakeLink:
    """One NVLink of a GPU: to another GPU (``peer`` index) or to an NVSwitch (``switch`` index)."""

    peer: int | None = None
    switch: int | None = None
    active: bool = True


@dataclass
class FakeGpu:
    """A physical GPU as the fake driver describes it.

    ``None`` for ``numa``, ``mig``, ``nvlinks`` or ``supported_events`` makes the matching NVML
    query answer ``NOT_SUPPORTED``; ``errors`` forces a return code per C function name.
    """

    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    bus_id: str = "00000000:07:00.0"
    pci_device_id: int = 0x20B010DE
    pci_subsystem_id: int = 0x134F10DE
    memory_mib: int = 40960
    minor: int = 0
    numa: int | None = 0
    mig: tuple[int, int] | None = (0, 0)
    nvlinks: list[FakeLink] | None = None
    supported_events: int | None = ALL_EVENTS
    lost: bool = False
    lost_handle: bool = False
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class QueuedEvent:
    """An event the driver will hand to ``nvmlEventSetWait_v2``."""

    gpu: int
    event_type: int = EVENT_XID
    data: int = 0
    gi: int = NO_INSTANCE
    ci: int = NO_INSTANCE


@dataclass(frozen=True)
class QueuedLoss:
    """The GPU falls off the bus while someone waits for events."""

    gpu: int


def parse_bus_id(bus_id: str) -> tuple[int, int, int]:
    domain, bus, rest = bus_id.split(":")
    device = rest.split(".")[0]
    return int(domain, 16), int(bus, 16), int(device, 16)


_HANDLE_BASE = 0x1000
_SET_BASE = 0x8000


class FakeNvml:
    """The fake library plus the driver state behind it.

    ``install()`` / ``uninstall()`` (or the ``fake_nvml`` fixture) swap it into pynvml. With
    ``init_error=Ret.LIBRARY_NOT_FOUND`` nothing is installed and pynvml's own loader is made to
    fail the way it does on a host without the driver.
    """

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        switches: list[str] | None = None,
        driver_version: str = "535.183.01",
        cuda_version: int = 12020,
        nvml_version: str = "12.535.183.01",
        init_error: int = Ret.SUCCESS,
        errors: dict[str, int] | None = None,
        absent: set[str] | None = None,
        switch_pci_device_id: int = 0x1AF110DE,
    ) -> None:
        self.gpus = gpus
        self.switches = switches or []
        self.switch_pci_device_id = switch_pci_device_id
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.nvml_version = nvml_version
        self.init_error = init_error
        self.errors: dict[str, int] = dict(errors or {})
        self.absent = set(absent or ())
        self.events: queue.Queue[QueuedEvent | QueuedLoss] = queue.Queue()
        self.calls: Counter[str] = Counter()
        self.internal_errors: list[BaseException] = []
        self.init_count = 0
        self.sets: dict[int, dict[int, int]] = {}  # set handle -> {device handle: event mask}
        self.freed_sets: list[int] = []
        self.waiting = threading.Event()  # set while some thread is inside nvmlEventSetWait_v2
        self._next_set = _SET_BASE
        self._lock = threading.RLock()
        self._saved: dict[str, Any] = {}
        self.lib = self._build_lib()

    # ---- test-facing helpers ------------------------------------------------------------------

    def push_xid(self, index: int, xid: int, gi: int = NO_INSTANCE, ci: int = NO_INSTANCE) -> None:
        self.events.put(QueuedEvent(index, EVENT_XID, xid, gi, ci))

    def push_event(self, event: QueuedEvent) -> None:
        self.events.put(event)

    def lose(self, index: int) -> None:
        """Make GPU ``index`` fall off the bus the next time the event set is waited on."""
        self.events.put(QueuedLoss(index))

    @staticmethod
    def handle_of(index: int) -> int:
        return _HANDLE_BASE + 0x10 * index

    def install(self) -> None:
        self._saved = {
            "nvmlLib": pynvml.nvmlLib,
            "CDLL": pynvml.CDLL,
            "refcount": pynvml._nvmlLib_refcount,
        }
        pynvml._nvmlGetFunctionPointer_cache.clear()
        if self.init_error == Ret.LIBRARY_NOT_FOUND:
            pynvml.nvmlLib = None
            pynvml.CDLL = _missing_library
        else:
            pynvml.nvmlLib = self.lib

    def uninstall(self) -> None:
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml.nvmlLib = None
        pynvml.CDLL = self._saved.get("CDLL", ctypes.CDLL)
        pynvml._nvmlLib_refcount = 0

    # ---- the library ---------------------------------------------------------------------------

    def _build_lib(self) -> object:
        lib = _Lib()
        ret = c_int
        signatures: dict[str, tuple[Any, ...]] = {
            "nvmlInitWithFlags": (ret, c_uint),
            "nvmlInit_v2": (ret,),
            "nvmlShutdown": (ret,),
            "nvmlSystemGetDriverVersion": (ret, c_void_p, c_uint),
            "nvmlSystemGetNVMLVersion": (ret, c_void_p, c_uint),
            "nvmlSystemGetCudaDriverVersion": (ret, c_void_p),
            "nvmlSystemGetCudaDriverVersion_v2": (ret, c_void_p),
            "nvmlDeviceGetCount_v2": (ret, c_void_p),
            "nvmlDeviceGetHandleByIndex_v2": (ret, c_uint, c_void_p),
            "nvmlDeviceGetUUID": (ret, c_void_p, c_void_p, c_uint),
            "nvmlDeviceGetName": (ret, c_void_p, c_void_p, c_uint),
            "nvmlDeviceGetPciInfo_v3": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetMemoryInfo": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetMinorNumber": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetNumaNodeId": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetMigMode": (ret, c_void_p, c_void_p, c_void_p),
            "nvmlDeviceGetNvLinkState": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetNvLinkRemotePciInfo_v2": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetNvLinkRemoteDeviceType": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetSupportedEventTypes": (ret, c_void_p, c_void_p),
            "nvmlEventSetCreate": (ret, c_void_p),
            "nvmlDeviceRegisterEvents": (ret, c_void_p, c_ulonglong, c_void_p),
            "nvmlEventSetWait_v2": (ret, c_void_p, c_void_p, c_uint),
            "nvmlEventSetFree": (ret, c_void_p),
        }
        for name, (restype, *argtypes) in signatures.items():
            if name in self.absent:
                continue
            impl = getattr(self, "_" + name)
            proto = ctypes.CFUNCTYPE(restype, *argtypes)
            setattr(lib, name, proto(self._guard(name, impl)))
        # nvmlErrorString returns a const char*; pynvml sets restype=c_char_p on it, so the callback
        # returns the address of a buffer kept alive here.
        self._error_strings: dict[int, ctypes.Array[ctypes.c_char]] = {}
        proto = ctypes.CFUNCTYPE(c_void_p, c_int)
        lib.nvmlErrorString = proto(self._nvmlErrorString)
        return lib

    def _guard(self, name: str, impl: Callable[..., int]) -> Callable[..., int]:
        """Count the call, apply forced errors, and never let a Python error escape a callback
        (ctypes would print it and return 0, i.e. SUCCESS, to pynvml)."""

        def call(*args: Any) -> int:
            try:
                with self._lock:
                    self.calls[name] += 1
                    if name in self.errors:
                        return self.errors[name]
                return int(impl(*args))
            except BaseException as exc:
                self.internal_errors.append(exc)
                return Ret.UNKNOWN

        return call

    def _nvmlErrorString(self, code: int) -> int:
        if code not in self._error_strings:
            text = Ret(code).name if code in Ret._value2member_map_ else f"code {code}"
            self._error_strings[code] = ctypes.create_string_buffer(text.encode())
        return ctypes.addressof(self._error_strings[code])

    # ---- helpers for the implementations -------------------------------------------------------

    def _gpu(self, handle: int | None) -> tuple[int, FakeGpu] | int:
        """The GPU behind ``handle``, or the return code a real driver gives for it."""
        if not self.init_count:
            return Ret.UNINITIALIZED
        if handle is None:
            return Ret.INVALID_ARGUMENT
        index, rem = divmod(handle - _HANDLE_BASE, 0x10)
        if rem or not 0 <= index < len(self.gpus):
            return Ret.INVALID_ARGUMENT
        return index, self.gpus[index]

    def _device_call(self, name: str, handle: int | None) -> tuple[int, FakeGpu] | int:
        found = self._gpu(handle)
        if isinstance(found, int):
            return found
        _, gpu = found
        if name in gpu.errors:
            return gpu.errors[name]
        if gpu.lost:
            return Ret.GPU_IS_LOST
        return found

    @staticmethod
    def _put_string(addr: int | None, length: int, text: str) -> int:
        if addr is None:
            return Ret.INVALID_ARGUMENT
        data = text.encode() + b"\0"
        if length < len(data):
            return Ret.INSUFFICIENT_SIZE
        ctypes.memmove(addr, data, len(data))
        return Ret.SUCCESS

    @staticmethod
    def _put(ctype: Any, addr: int | None, value: int) -> int:
        if addr is None:
            return Ret.INVALID_ARGUMENT
        ctype.from_address(addr).value = value
        return Ret.SUCCESS

    def _put_pci(self, addr: int | None, bus_id: str, device_id: int, subsystem: int) -> int:
        if addr is None:
            return Ret.INVALID_ARGUMENT
        info = PciInfo.from_address(addr)
        domain, bus, device = parse_bus_id(bus_id)
        info.busIdLegacy = f"{domain:04X}:{bus:02X}:{device:02X}.0".encode()
        info.busId = bus_id.encode()
        info.domain, info.bus, info.device = domain, bus, device
        info.pciDeviceId = device_id
        info.pciSubSystemId = subsystem
        return Ret.SUCCESS

    # ---- init / system -------------------------------------------------------------------------

    def _nvmlInitWithFlags(self, flags: int) -> int:
        if self.init_error:
            return self.init_error
        self.init_count += 1
        return Ret.SUCCESS

    def _nvmlInit_v2(self) -> int:
        return self._nvmlInitWithFlags(0)

    def _nvmlShutdown(self) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        self.init_count -= 1
        return Ret.SUCCESS

    def _system_string(self, value: str, addr: int | None, length: int) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        return self._put_string(addr, length, value)

    def _nvmlSystemGetDriverVersion(self, addr: int | None, length: int) -> int:
        return self._system_string(self.driver_version, addr, length)

    def _nvmlSystemGetNVMLVersion(self, addr: int | None, length: int) -> int:
        return self._system_string(self.nvml_version, addr, length)

    def _nvmlSystemGetCudaDriverVersion(self, addr: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        return self._put(c_int, addr, self.cuda_version)

    def _nvmlSystemGetCudaDriverVersion_v2(self, addr: int | None) -> int:
        return self._nvmlSystemGetCudaDriverVersion(addr)

    # ---- devices -------------------------------------------------------------------------------

    def _nvmlDeviceGetCount_v2(self, addr: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        return self._put(c_uint, addr, len(self.gpus))

    def _nvmlDeviceGetHandleByIndex_v2(self, index: int, addr: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        if addr is None or index >= len(self.gpus):
            return Ret.INVALID_ARGUMENT
        gpu = self.gpus[index]
        if "nvmlDeviceGetHandleByIndex_v2" in gpu.errors:
            return gpu.errors["nvmlDeviceGetHandleByIndex_v2"]
        if gpu.lost and gpu.lost_handle:
            return Ret.GPU_IS_LOST
        return self._put(c_void_p, addr, self.handle_of(index))

    def _nvmlDeviceGetUUID(self, handle: int | None, addr: int | None, length: int) -> int:
        found = self._device_call("nvmlDeviceGetUUID", handle)
        if isinstance(found, int):
            return found
        return self._put_string(addr, length, found[1].uuid)

    def _nvmlDeviceGetName(self, handle: int | None, addr: int | None, length: int) -> int:
        found = self._device_call("nvmlDeviceGetName", handle)
        if isinstance(found, int):
            return found
        return self._put_string(addr, length, found[1].name)

    def _nvmlDeviceGetPciInfo_v3(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetPciInfo_v3", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        return self._put_pci(addr, gpu.bus_id, gpu.pci_device_id, gpu.pci_subsystem_id)

    def _nvmlDeviceGetMemoryInfo(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetMemoryInfo", handle)
        if isinstance(found, int):
            return found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        total = found[1].memory_mib * 1024 * 1024
        mem = Memory.from_address(addr)
        mem.total, mem.used = total, 512 * 1024 * 1024
        mem.free = total - mem.used
        return Ret.SUCCESS

    def _nvmlDeviceGetMinorNumber(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetMinorNumber", handle)
        if isinstance(found, int):
            return found
        return self._put(c_uint, addr, found[1].minor)

    def _nvmlDeviceGetNumaNodeId(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetNumaNodeId", handle)
        if isinstance(found, int):
            return found
        if found[1].numa is None:
            return Ret.NOT_SUPPORTED
        return self._put(c_uint, addr, found[1].numa)

    def _nvmlDeviceGetMigMode(self, handle: int | None, cur: int | None, pend: int | None) -> int:
        found = self._device_call("nvmlDeviceGetMigMode", handle)
        if isinstance(found, int):
            return found
        mig = found[1].mig
        if mig is None:
            return Ret.NOT_SUPPORTED
        if cur is None or pend is None:
            return Ret.INVALID_ARGUMENT
        self._put(c_uint, cur, mig[0])
        return self._put(c_uint, pend, mig[1])

    def _link(self, name: str, handle: int | None, link: int) -> FakeLink | int:
        found = self._device_call(name, handle)
        if isinstance(found, int):
            return found
        links = found[1].nvlinks
        if links is None:
            return Ret.NOT_SUPPORTED
        if link >= len(links):
            return Ret.INVALID_ARGUMENT
        return links[link]

    def _nvmlDeviceGetNvLinkState(self, handle: int | None, link: int, addr: int | None) -> int:
        found = self._link("nvmlDeviceGetNvLinkState", handle, link)
        if isinstance(found, int):
            return found
        return self._put(c_uint, addr, 1 if found.active else 0)

    def _nvmlDeviceGetNvLinkRemotePciInfo_v2(
        self, handle: int | None, link: int, addr: int | None
    ) -> int:
        found = self._link("nvmlDeviceGetNvLinkRemotePciInfo_v2", handle, link)
        if isinstance(found, int):
            return found
        if not found.active:
            return Ret.INVALID_ARGUMENT
        if found.switch is not None:
            return self._put_pci(addr, self.switches[found.switch], self.switch_pci_device_id, 0)
        peer = self.gpus[found.peer or 0]
        return self._put_pci(addr, peer.bus_id, peer.pci_device_id, peer.pci_subsystem_id)

    def _nvmlDeviceGetNvLinkRemoteDeviceType(
        self, handle: int | None, link: int, addr: int | None
    ) -> int:
        found = self._link("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
        if isinstance(found, int):
            return found
        if not found.active:
            return Ret.INVALID_ARGUMENT
        kind = NVLINK_DEVICE_TYPE_SWITCH if found.switch is not None else NVLINK_DEVICE_TYPE_GPU
        return self._put(c_uint, addr, kind)

    # ---- events --------------------------------------------------------------------------------

    def _nvmlDeviceGetSupportedEventTypes(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetSupportedEventTypes", handle)
        if isinstance(found, int):
            return found
        if found[1].supported_events is None:
            return Ret.NOT_SUPPORTED
        return self._put(c_ulonglong, addr, found[1].supported_events)

    def _nvmlEventSetCreate(self, addr: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        with self._lock:
            handle = self._next_set
            self._next_set += 0x10
            self.sets[handle] = {}
        return self._put(c_void_p, addr, handle)

    def _nvmlDeviceRegisterEvents(self, handle: int | None, types: int, set_: int | None) -> int:
        found = self._device_call("nvmlDeviceRegisterEvents", handle)
        if isinstance(found, int):
            return found
        if set_ not in self.sets:
            return Ret.INVALID_ARGUMENT
        supported = found[1].supported_events
        if supported is None or types & ~supported:
            return Ret.NOT_SUPPORTED
        assert handle is not None
        with self._lock:
            self.sets[set_][handle] = self.sets[set_].get(handle, 0) | types
        return Ret.SUCCESS

    def _nvmlEventSetFree(self, set_: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        with self._lock:
            if set_ not in self.sets:
                return Ret.INVALID_ARGUMENT
            del self.sets[set_]
            self.freed_sets.append(set_)
        return Ret.SUCCESS

    def _set_has_lost_gpu(self, set_: int) -> bool:
        for handle in self.sets.get(set_, {}):
            found = self._gpu(handle)
            if not isinstance(found, int) and found[1].lost:
                return True
        return False

    def _nvmlEventSetWait_v2(self, set_: int | None, addr: int | None, timeout_ms: int) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        if set_ not in self.sets or addr is None:
            return Ret.INVALID_ARGUMENT
        self.waiting.set()
        try:
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                with self._lock:
                    if self._set_has_lost_gpu(set_):
                        return Ret.GPU_IS_LOST
                left = deadline - time.monotonic()
                if left <= 0:
                    return Ret.TIMEOUT
                try:
                    item = self.events.get(timeout=left)
                except queue.Empty:
                    return Ret.TIMEOUT
                with self._lock:
                    if isinstance(item, QueuedLoss):
                        self.gpus[item.gpu].lost = True
                        continue
                    handle = self.handle_of(item.gpu)
                    mask = self.sets.get(set_, {}).get(handle, 0)
                    if not mask & item.event_type:
                        continue  # the driver delivers only what was registered
                    data = EventData.from_address(addr)
                    data.device = handle
                    data.eventType = item.event_type
                    data.eventData = item.data
                    data.gpuInstanceId = item.gi
                    data.computeInstanceId = item.ci
                    return Ret.SUCCESS
        finally:
            self.waiting.clear()


class _Lib:
    """Stands in for the ``CDLL`` object: pynvml only ever does ``getattr(nvmlLib, name)``."""


def _missing_library(name: str, *args: Any, **kwargs: Any) -> ctypes.CDLL:
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


@contextlib.contextmanager
def installed(fake: FakeNvml) -> Iterator[FakeNvml]:
    fake.install()
    try:
        yield fake
    finally:
        fake.uninstall()


# ---- ready-made machines ------------------------------------------------------------------------

DGX_A100_BUS_IDS = [
    "00000000:07:00.0",
    "00000000:0F:00.0",
    "00000000:47:00.0",
    "00000000:4E:00.0",
    "00000000:87:00.0",
    "00000000:90:00.0",
    "00000000:B7:00.0",
    "00000000:BD:00.0",
]
DGX_A100_SWITCHES = [f"00000000:{bus:02X}:00.0" for bus in range(0xC4, 0xCA)]


def dgx_a100_uuid(index: int) -> str:
    return f"GPU-{index:x}1f2c3d4-5e6f-7081-92a3-b4c5d6e7f8{index:02x}"


def dgx_a100(**kwargs: Any) -> FakeNvml:
    """Eight A100-SXM4-40GB on six NVSwitches, two links to each (12 NVLinks per GPU)."""
    gpus = [
        FakeGpu(
            uuid=dgx_a100_uuid(i),
            bus_id=bus,
            minor=i,
            numa=0 if i < 4 else 1,
            nvlinks=[FakeLink(switch=link // 2) for link in range(12)],
        )
        for i, bus in enumerate(DGX_A100_BUS_IDS)
    ]
    return FakeNvml(gpus, switches=DGX_A100_SWITCHES, **kwargs)


def t4(**kwargs: Any) -> FakeNvml:
    """One Tesla T4: no MIG, no NVLink, no NUMA affinity reported (single socket / VM)."""
    gpu = FakeGpu(
        uuid="GPU-9c2b5f0e-1d3a-4b6c-8e7f-0a1b2c3d4e5f",
        name="Tesla T4",
        bus_id="00000000:00:1E.0",
        pci_device_id=0x1EB810DE,
        pci_subsystem_id=0x12A210DE,
        memory_mib=15360,
        minor=0,
        numa=None,
        mig=None,
        nvlinks=None,
    )
    return FakeNvml([gpu], **kwargs)
