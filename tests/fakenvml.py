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

MIG follows the NVML header and shared/reference/mig-profiles.md (§1.3, §4, §7, §8), with the
profile tables of :mod:`gpud.mig.catalog`:

* ``nvmlDeviceGetGpuInstanceProfileInfo[V]`` takes the NVML *enum* and answers ``info.id``, the
  device profile ID (19 for A100 1g.5gb, 14 for A30 1g.6gb); every other call takes ``info.id``.
  Enums the board lacks, and every enum while MIG is currently off, answer ``NOT_SUPPORTED``;
  enums at or past ``NVML_GPU_INSTANCE_PROFILE_COUNT`` answer ``INVALID_ARGUMENT``.
* Creating a GI at a placement its profile does not offer is ``INVALID_ARGUMENT``; sharing a memory
  slice with another GI, or one GI more than ``instanceCount``, is ``INSUFFICIENT_RESOURCES``.
  Destroying a GI that still has CIs, or a CI a process runs on, is ``IN_USE``.
* ``nvmlDeviceSetMigMode`` records the request as the pending mode; a board whose family needs a
  reset (Ampere, ``Family.mode_change_needs_reset``) keeps its current mode until
  :meth:`FakeNvml.reset_gpu`, later ones switch at once. (A bare-metal driver may reset an idle
  Ampere board by itself; the fake always leaves that to the caller, the path gpud must handle.)
  While processes (or, when disabling, GPU instances) hold the board, ``activationStatus`` answers
  ``IN_USE`` and only the pending mode changes, as nvidia-smi's "pending enable state ... In use by
  another client" shows.
* MIG device handles are their own handle space (``nvmlDeviceIsMigDeviceHandle`` tells them apart)
  and carry random ``MIG-`` UUIDs; ``nvmlDeviceGetMigDeviceHandleByIndex`` answers ``NOT_FOUND``
  for an empty slot, and slots are reused lowest-first, so holes appear after a destroy.
* Processes on the GPU handle are the aggregate of every MIG device (each tagged with its GI and CI
  ID), on a MIG handle only that device's, as the header's note on
  ``nvmlDeviceGetComputeRunningProcesses`` says; the aggregate comes "only if the caller has
  appropriate privileges", so with ``root=False`` the GPU handle lists whole-GPU processes only.

Where the driver's choice is not documented the fake picks one and says so: GI IDs are the lowest
free in 1..(compute slices), unrelated to the placement (as on hardware); CI IDs the lowest free
from 0; a CI goes to the lowest free start aligned to its size. Calls NVML marks "Requires root" or
"Requires privileged user" answer ``NO_PERMISSION`` with ``root=False``.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import queue
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml

from gpud.hw.types import CiProfile, GiProfile
from gpud.mig.catalog import Family, family_for

c_int, c_uint, c_ulonglong, c_void_p, c_char, c_double = (
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_ulonglong,
    ctypes.c_void_p,
    ctypes.c_char,
    ctypes.c_double,
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
    RESET_REQUIRED = 16
    LIB_RM_VERSION_MISMATCH = 18
    IN_USE = 19
    INSUFFICIENT_RESOURCES = 23
    ARGUMENT_VERSION_MISMATCH = 25
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

MIG_DISABLE = 0
MIG_ENABLE = 1
# NVML_GPU_INSTANCE_PROFILE_COUNT / NVML_COMPUTE_INSTANCE_PROFILE_COUNT of the NVML 13 header: the
# fake's "driver" knows this many enums; the set grows between releases, hence INVALID_ARGUMENT past
# it rather than a count a caller could read.
GI_PROFILE_COUNT = 0x12
CI_PROFILE_COUNT = 0x9
CI_ENGINE_PROFILE_COUNT = 0x1
_NAME_BUFFER = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE


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


class GpuInstancePlacement(ctypes.Structure):
    _fields_ = [("start", c_uint), ("size", c_uint)]


_GI_PROFILE_FIELDS = [
    ("id", c_uint),
    ("isP2pSupported", c_uint),
    ("sliceCount", c_uint),
    ("instanceCount", c_uint),
    ("multiprocessorCount", c_uint),
    ("copyEngineCount", c_uint),
    ("decoderCount", c_uint),
    ("encoderCount", c_uint),
    ("jpegCount", c_uint),
    ("ofaCount", c_uint),
    ("memorySizeMB", c_ulonglong),
]


class GpuInstanceProfileInfo(ctypes.Structure):
    _fields_ = _GI_PROFILE_FIELDS


class GpuInstanceProfileInfoV2(ctypes.Structure):
    _fields_ = [("version", c_uint), *_GI_PROFILE_FIELDS, ("name", c_char * _NAME_BUFFER)]


class GpuInstanceInfo(ctypes.Structure):
    _fields_ = [
        ("device", c_void_p),
        ("id", c_uint),
        ("profileId", c_uint),
        ("placement", GpuInstancePlacement),
    ]


class ComputeInstancePlacement(ctypes.Structure):
    _fields_ = [("start", c_uint), ("size", c_uint)]


_CI_PROFILE_FIELDS = [
    ("id", c_uint),
    ("sliceCount", c_uint),
    ("instanceCount", c_uint),
    ("multiprocessorCount", c_uint),
    ("sharedCopyEngineCount", c_uint),
    ("sharedDecoderCount", c_uint),
    ("sharedEncoderCount", c_uint),
    ("sharedJpegCount", c_uint),
    ("sharedOfaCount", c_uint),
]


class ComputeInstanceProfileInfo(ctypes.Structure):
    _fields_ = _CI_PROFILE_FIELDS


class ComputeInstanceProfileInfoV2(ctypes.Structure):
    _fields_ = [("version", c_uint), *_CI_PROFILE_FIELDS, ("name", c_char * _NAME_BUFFER)]


class ComputeInstanceInfo(ctypes.Structure):
    _fields_ = [
        ("device", c_void_p),
        ("gpuInstance", c_void_p),
        ("id", c_uint),
        ("profileId", c_uint),
        ("placement", ComputeInstancePlacement),
    ]


class ProcessInfo(ctypes.Structure):
    """``nvmlProcessInfo_t`` (= ``nvmlProcessInfo_v2_t``), what the ``_v2``/``_v3`` calls fill."""

    _fields_ = [
        ("pid", c_uint),
        ("usedGpuMemory", c_ulonglong),
        ("gpuInstanceId", c_uint),
        ("computeInstanceId", c_uint),
    ]


class MemoryV2(ctypes.Structure):
    _fields_ = [
        ("version", c_uint),
        ("total", c_ulonglong),
        ("reserved", c_ulonglong),
        ("free", c_ulonglong),
        ("used", c_ulonglong),
    ]


class TemperatureV1(ctypes.Structure):
    _fields_ = [("version", c_uint), ("sensorType", c_int), ("temperature", c_int)]


class Utilization(ctypes.Structure):
    _fields_ = [("gpu", c_uint), ("memory", c_uint)]


class Value(ctypes.Union):
    _fields_ = [
        ("dVal", c_double),
        ("uiVal", c_uint),
        ("ulVal", ctypes.c_ulong),
        ("ullVal", c_ulonglong),
        ("sllVal", ctypes.c_longlong),
        ("siVal", c_int),
        ("usVal", ctypes.c_ushort),
    ]


class FieldValue(ctypes.Structure):
    _fields_ = [
        ("fieldId", c_uint),
        ("scopeId", c_uint),
        ("timestamp", ctypes.c_longlong),
        ("latencyUsec", ctypes.c_longlong),
        ("valueType", c_int),
        ("nvmlReturn", c_int),
        ("value", Value),
    ]


class GridLicenseExpiry(ctypes.Structure):
    _fields_ = [
        ("year", ctypes.c_uint32),
        ("month", ctypes.c_uint16),
        ("day", ctypes.c_uint16),
        ("hour", ctypes.c_uint16),
        ("min", ctypes.c_uint16),
        ("sec", ctypes.c_uint16),
        ("status", ctypes.c_uint8),
    ]


class GridLicensableFeatureV4(ctypes.Structure):
    _fields_ = [
        ("featureCode", c_int),
        ("featureState", c_uint),
        ("licenseInfo", c_char * 128),
        ("productName", c_char * 128),
        ("featureEnabled", c_uint),
        ("licenseExpiry", GridLicenseExpiry),
    ]


class GridLicensableFeaturesV4(ctypes.Structure):
    _fields_ = [
        ("isGridLicenseSupported", c_int),
        ("licensableFeaturesCount", c_uint),
        ("gridLicensableFeatures", GridLicensableFeatureV4 * 3),
    ]


class GpmMetricInfo(ctypes.Structure):
    _fields_ = [("shortName", c_void_p), ("longName", c_void_p), ("unit", c_void_p)]


class GpmMetric(ctypes.Structure):
    _fields_ = [
        ("metricId", c_uint),
        ("nvmlReturn", c_int),
        ("value", c_double),
        ("metricInfo", GpmMetricInfo),
    ]


# NVML_GPM_METRIC_MAX of the NVML 13 header; the library reads only numMetrics entries, so a
# caller built against an older header (a smaller array) works the same.
GPM_METRIC_MAX = 477


class GpmMetricsGet(ctypes.Structure):
    _fields_ = [
        ("version", c_uint),
        ("numMetrics", c_uint),
        ("sample1", c_void_p),
        ("sample2", c_void_p),
        ("metrics", GpmMetric * GPM_METRIC_MAX),
    ]


class GpmSupport(ctypes.Structure):
    _fields_ = [("version", c_uint), ("isSupportedDevice", c_uint)]


def _struct_version(struct: type[ctypes.Structure], version: int) -> int:
    """``NVML_STRUCT_VERSION``: the size of the versioned struct with the version in the top byte.

    Computed from the layouts above, so a caller passing pynvml's constant proves that both sides
    agree on the struct's size.
    """
    return ctypes.sizeof(struct) | (version << 24)


GI_PROFILE_INFO_V2 = _struct_version(GpuInstanceProfileInfoV2, 2)
CI_PROFILE_INFO_V2 = _struct_version(ComputeInstanceProfileInfoV2, 2)
MEMORY_V2 = _struct_version(MemoryV2, 2)
TEMPERATURE_V1 = _struct_version(TemperatureV1, 1)
GPM_METRICS_GET_VERSION = 1  # nvml.h NVML_GPM_METRICS_GET_VERSION
GPM_SUPPORT_VERSION = 1  # nvml.h NVML_GPM_SUPPORT_VERSION

# nvmlValueType_t
VALUE_DOUBLE, VALUE_UINT, VALUE_ULONG, VALUE_ULONGLONG = 0, 1, 2, 3

# Field IDs (nvml.h NVML_FI_DEV_*) the fake answers, and GPM metric IDs (NVML_GPM_METRIC_*).
FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_PCIE_REPLAY_COUNTER = 94
FI_NVLINK_THROUGHPUT_DATA_TX = 138
FI_NVLINK_THROUGHPUT_DATA_RX = 139
FI_REMAPPED_COR = 142
FI_REMAPPED_UNC = 143
FI_REMAPPED_PENDING = 144
FI_REMAPPED_FAILURE = 145
GPM_GRAPHICS_UTIL = 1
GPM_ANY_TENSOR_UTIL = 5
GPM_DRAM_BW_UTIL = 10
GPM_PCIE_TX_PER_SEC = 20
GPM_PCIE_RX_PER_SEC = 21

CLOCK_GRAPHICS, CLOCK_SM, CLOCK_MEM, CLOCK_VIDEO = 0, 1, 2, 3
TEMPERATURE_GPU = 0
GRID_LICENSE_FEATURE_CODE_VGPU = 1


@dataclass
class FakeComputeInstance:
    """A compute instance = one MIG device; ``slot`` is its MIG device index under the GPU."""

    ci_id: int
    profile_id: int
    slices: int
    start: int
    uuid: str
    slot: int
    handle: int
    mig_handle: int


@dataclass
class FakeGpuInstance:
    gi_id: int
    profile_id: int
    start: int
    size: int
    handle: int
    compute_instances: dict[int, FakeComputeInstance] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeProcess:
    """A compute process; ``gi``/``ci`` name the MIG device it runs on (NO_INSTANCE: none)."""

    pid: int
    used_mib: int = 0
    gi: int = NO_INSTANCE
    ci: int = NO_INSTANCE


@dataclass
class FakeLink:
    """One NVLink of a GPU: to another GPU (``peer`` index) or to an NVSwitch (``switch`` index)."""

    peer: int | None = None
    switch: int | None = None
    active: bool = True


@dataclass
class FakeTelemetry:
    """What a board's sensors and counters read, in NVML's units; ``None`` makes the reading
    answer ``NOT_SUPPORTED`` (the board does not have it).

    Independent of this, the fake applies NVML's MIG rules (cluster-integration.md §1.4):
    utilization, encoder and decoder calls answer NOT_SUPPORTED while MIG is on, and the
    remapped-rows fields while GPU instances exist. ``gpm`` holds what the hardware measured
    between two GPM samples of the whole GPU, by metric ID (None: no GPM, as before Hopper);
    ``instance_gpm`` the same per GPU instance. NVLink counters answer NOT_SUPPORTED on a board
    without NVLink (``FakeGpu.nvlinks`` None).
    """

    sm_clock_mhz: int = 1410
    mem_clock_mhz: int = 1215
    gpu_temp_c: int = 41
    memory_temp_c: int | None = 47
    power_mw: int = 254_321
    energy_mj: int = 98_765_432_100
    pcie_replays: int = 3
    gpu_util: int = 67
    mem_util: int = 31
    enc_util: int = 0
    dec_util: int = 5
    used_mib: int = 20_480
    reserved_mib: int = 579
    nvlink_tx_kib: int = 10_000_000
    nvlink_rx_kib: int = 12_000_000
    # correctable, uncorrectable, pending, failure
    remapped: tuple[int, int, int, int] | None = (2, 1, 0, 0)
    # isGridLicenseSupported (None: the call answers NOT_SUPPORTED), and the vGPU feature's state.
    grid_license_supported: bool | None = False
    vgpu_licensed: bool = False
    gpm: dict[int, float] | None = None
    instance_gpm: dict[int, dict[int, float]] = field(default_factory=dict)
    instance_used_mib: dict[int, int] = field(default_factory=dict)
    instance_reserved_mib: int = 6


def hopper_gpm() -> dict[int, float]:
    """GPM metrics of a busy Hopper board, as NVML reports them (percent, MiB/s)."""
    return {
        GPM_GRAPHICS_UTIL: 72.5,
        GPM_ANY_TENSOR_UTIL: 41.25,
        GPM_DRAM_BW_UTIL: 55.0,
        GPM_PCIE_TX_PER_SEC: 1536.0,
        GPM_PCIE_RX_PER_SEC: 2048.0,
    }


@dataclass(frozen=True)
class GpmSample:
    """What one GPM sample buffer holds once taken: whose it is and when (a sequence number)."""

    gpu: int
    gi: int | None
    seq: int


@dataclass
class FakeGpu:
    """A physical GPU as the fake driver describes it.

    ``None`` for ``numa``, ``mig``, ``compute_capability``, ``nvlinks`` or ``supported_events``
    makes the matching NVML query answer ``NOT_SUPPORTED``; ``errors`` forces a return code per C
    function name.
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
    compute_capability: tuple[int, int] | None = (8, 0)
    nvlinks: list[FakeLink] | None = None
    supported_events: int | None = ALL_EVENTS
    lost: bool = False
    lost_handle: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    # MIG: instances by GI ID, and the compute processes running on the board.
    gpu_instances: dict[int, FakeGpuInstance] = field(default_factory=dict)
    processes: list[FakeProcess] = field(default_factory=list)
    # activationStatus of nvmlDeviceSetMigMode when nothing holds the board: RESET_REQUIRED models a
    # pass-through VM whose reset the driver cannot trigger.
    activation_status: int = Ret.SUCCESS
    telemetry: FakeTelemetry = field(default_factory=FakeTelemetry)

    @property
    def family(self) -> Family | None:
        """The catalog family behind this board's MIG tables; None when it cannot do MIG."""
        return family_for(self.pci_device_id) if self.mig is not None else None

    @property
    def mig_enabled(self) -> bool:
        return self.mig is not None and self.mig[0] == MIG_ENABLE and self.family is not None


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
# GI, CI and MIG device handles each get their own range, never reused, so a handle kept past a
# destroy or reset is recognisably invalid.
_GI_BASE = 0x100000
_CI_BASE = 0x200000
_MIG_BASE = 0x300000
_GPM_BASE = 0x400000

# The MIG calls that change the GPU (the applier counts them); a reset is not an NVML call.
MIG_MUTATIONS = (
    "nvmlDeviceSetMigMode",
    "nvmlDeviceCreateGpuInstanceWithPlacement",
    "nvmlGpuInstanceCreateComputeInstance",
    "nvmlComputeInstanceDestroy",
    "nvmlGpuInstanceDestroy",
)


class FakeNvml:
    """The fake library plus the driver state behind it.

    ``install()`` / ``uninstall()`` (or the ``fake_nvml`` fixture) swap it into pynvml. With
    ``init_error=Ret.LIBRARY_NOT_FOUND`` nothing is installed and pynvml's own loader is made to
    fail the way it does on a host without the driver; :meth:`load_driver` is the driver arriving
    later, and :meth:`fail_init` a driver still settling when it is first used.
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
        root: bool = True,
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
        self._init_failures: list[int] = []
        self.sets: dict[int, dict[int, int]] = {}  # set handle -> {device handle: event mask}
        self.freed_sets: list[int] = []
        self.waiting = threading.Event()  # set while some thread is inside nvmlEventSetWait_v2
        self._next_set = _SET_BASE
        self.root = root
        # Live MIG handles: GI handle -> (gpu, gi), CI and MIG device handle -> (gpu, gi, ci).
        self._gi_handles: dict[int, tuple[int, int]] = {}
        self._ci_handles: dict[int, tuple[int, int, int]] = {}
        self._mig_handles: dict[int, tuple[int, int, int]] = {}
        self._next_handle = {"gi": _GI_BASE, "ci": _CI_BASE, "mig": _MIG_BASE, "gpm": _GPM_BASE}
        self.resets: list[int] = []  # GPU indices reset through reset_gpu(), in order
        # Wall clock (seconds) behind field-value timestamps; tests set it to step time.
        self.clock: Callable[[], float] = time.time
        # GPM sample buffers by handle: None until a sample is taken into it.
        self.gpm_samples: dict[int, GpmSample | None] = {}
        self._gpm_seq = 0
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

    def mutations(self) -> int:
        """How many MIG-changing NVML calls were made (successful or not)."""
        return sum(self.calls[name] for name in MIG_MUTATIONS)

    def index_of_bus_id(self, bus_id: str) -> int:
        for index, gpu in enumerate(self.gpus):
            if gpu.bus_id.upper() == bus_id.upper():
                return index
        raise LookupError(f"no fake GPU at {bus_id}")

    def reset_gpu(self, index: int) -> int:
        """What ``nvidia-smi -r`` does to the board: the pending MIG mode takes effect and no GPU
        or compute instance survives. Refused with IN_USE while processes run, as nvidia-smi is."""
        gpu = self.gpus[index]
        with self._lock:
            if gpu.processes:
                return Ret.IN_USE
            for gi_id in list(gpu.gpu_instances):
                self._drop_gpu_instance(index, gi_id)
            if gpu.mig is not None:
                gpu.mig = (gpu.mig[1], gpu.mig[1])
            self.resets.append(index)
        return Ret.SUCCESS

    def mig_uuid(self, index: int, gi_id: int, ci_id: int) -> str:
        return self.gpus[index].gpu_instances[gi_id].compute_instances[ci_id].uuid

    def start_process(
        self, index: int, pid: int, used_mib: int = 0, mig_uuid: str | None = None
    ) -> None:
        """A compute process on the whole GPU, or on the MIG device ``mig_uuid``."""
        gpu = self.gpus[index]
        gi = ci = NO_INSTANCE
        if mig_uuid is not None:
            gi, ci = next(
                (g.gi_id, c.ci_id)
                for g in gpu.gpu_instances.values()
                for c in g.compute_instances.values()
                if c.uuid == mig_uuid
            )
        with self._lock:
            gpu.processes.append(FakeProcess(pid, used_mib, gi, ci))

    def stop_process(self, index: int, pid: int) -> None:
        gpu = self.gpus[index]
        with self._lock:
            gpu.processes = [p for p in gpu.processes if p.pid != pid]

    def fail_init(self, *codes: int) -> None:
        """The next ``len(codes)`` ``nvmlInit`` calls answer these codes, in order, whatever
        ``init_error`` says."""
        with self._lock:
            self._init_failures.extend(codes)

    def load_driver(self) -> None:
        """The driver package is installed and its module loaded: ``nvmlInit`` works, and where
        the library was missing pynvml's own loader now finds it (``CDLL`` answers this fake)."""
        with self._lock:
            missing = self.init_error == Ret.LIBRARY_NOT_FOUND
            self.init_error = Ret.SUCCESS
        if missing:
            pynvml.CDLL = self._load_library

    def _load_library(self, name: str, *args: Any, **kwargs: Any) -> object:
        if name != "libnvidia-ml.so.1":
            return _missing_library(name)
        return self.lib

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
            "nvmlDeviceGetCudaComputeCapability": (ret, c_void_p, c_void_p, c_void_p),
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
            # MIG (nvml.h, "Multi Instance GPU Management"); handles are opaque pointers.
            "nvmlDeviceSetMigMode": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetGpuInstanceProfileInfo": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetGpuInstanceProfileInfoV": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetGpuInstancePossiblePlacements_v2": (
                ret,
                c_void_p,
                c_uint,
                c_void_p,
                c_void_p,
            ),
            "nvmlDeviceCreateGpuInstanceWithPlacement": (ret, c_void_p, c_uint, c_void_p, c_void_p),
            "nvmlGpuInstanceDestroy": (ret, c_void_p),
            "nvmlDeviceGetGpuInstances": (ret, c_void_p, c_uint, c_void_p, c_void_p),
            "nvmlDeviceGetGpuInstanceById": (ret, c_void_p, c_uint, c_void_p),
            "nvmlGpuInstanceGetInfo": (ret, c_void_p, c_void_p),
            "nvmlGpuInstanceGetComputeInstanceProfileInfo": (
                ret,
                c_void_p,
                c_uint,
                c_uint,
                c_void_p,
            ),
            "nvmlGpuInstanceGetComputeInstanceProfileInfoV": (
                ret,
                c_void_p,
                c_uint,
                c_uint,
                c_void_p,
            ),
            "nvmlGpuInstanceCreateComputeInstance": (ret, c_void_p, c_uint, c_void_p),
            "nvmlComputeInstanceDestroy": (ret, c_void_p),
            "nvmlGpuInstanceGetComputeInstances": (ret, c_void_p, c_uint, c_void_p, c_void_p),
            "nvmlGpuInstanceGetComputeInstanceById": (ret, c_void_p, c_uint, c_void_p),
            "nvmlComputeInstanceGetInfo_v2": (ret, c_void_p, c_void_p),
            "nvmlDeviceIsMigDeviceHandle": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetGpuInstanceId": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetComputeInstanceId": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetMaxMigDeviceCount": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetMigDeviceHandleByIndex": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetComputeRunningProcesses_v2": (ret, c_void_p, c_void_p, c_void_p),
            "nvmlDeviceGetComputeRunningProcesses_v3": (ret, c_void_p, c_void_p, c_void_p),
            # Telemetry (nvml.h "Device Queries", "Field Value Queries", "GPM").
            "nvmlDeviceGetFieldValues": (ret, c_void_p, c_int, c_void_p),
            "nvmlDeviceGetClockInfo": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetTemperature": (ret, c_void_p, c_uint, c_void_p),
            "nvmlDeviceGetTemperatureV": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetPowerUsage": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetUtilizationRates": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetEncoderUtilization": (ret, c_void_p, c_void_p, c_void_p),
            "nvmlDeviceGetDecoderUtilization": (ret, c_void_p, c_void_p, c_void_p),
            "nvmlDeviceGetMemoryInfo_v2": (ret, c_void_p, c_void_p),
            "nvmlDeviceGetGridLicensableFeatures_v4": (ret, c_void_p, c_void_p),
            "nvmlGpmQueryDeviceSupport": (ret, c_void_p, c_void_p),
            "nvmlGpmSampleAlloc": (ret, c_void_p),
            "nvmlGpmSampleFree": (ret, c_void_p),
            "nvmlGpmSampleGet": (ret, c_void_p, c_void_p),
            "nvmlGpmMigSampleGet": (ret, c_void_p, c_uint, c_void_p),
            "nvmlGpmMetricsGet": (ret, c_void_p),
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
        if self._init_failures:
            return self._init_failures.pop(0)
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
        found = self._any_device("nvmlDeviceGetUUID", handle)
        if isinstance(found, int):
            return found
        _, gpu, ci = found
        return self._put_string(addr, length, ci.uuid if ci is not None else gpu.uuid)

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

    def _nvmlDeviceGetCudaComputeCapability(
        self, handle: int | None, major: int | None, minor: int | None
    ) -> int:
        found = self._device_call("nvmlDeviceGetCudaComputeCapability", handle)
        if isinstance(found, int):
            return found
        capability = found[1].compute_capability
        if capability is None:
            return Ret.NOT_SUPPORTED
        ret = self._put(c_int, major, capability[0])
        return ret if ret != Ret.SUCCESS else self._put(c_int, minor, capability[1])

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

    # ---- telemetry -------------------------------------------------------------------------------

    def _fields_of(self, gpu: FakeGpu) -> dict[int, tuple[int, float | int] | int]:
        """Each field ID the fake knows: (value type, value), or the return code it answers."""
        t = gpu.telemetry
        nvlink = gpu.nvlinks is not None
        # "not supported on MIG-enabled GPUs with active instances" (nvmlDeviceGetRemappedRows).
        remapped = t.remapped if not (gpu.mig_enabled and gpu.gpu_instances) else None
        fields: dict[int, tuple[int, float | int] | int] = {
            FI_MEMORY_TEMP: Ret.NOT_SUPPORTED
            if t.memory_temp_c is None
            else (VALUE_UINT, t.memory_temp_c),
            FI_TOTAL_ENERGY_CONSUMPTION: (VALUE_ULONGLONG, t.energy_mj),
            FI_PCIE_REPLAY_COUNTER: (VALUE_UINT, t.pcie_replays),
            FI_NVLINK_THROUGHPUT_DATA_TX: (VALUE_ULONGLONG, t.nvlink_tx_kib)
            if nvlink
            else Ret.NOT_SUPPORTED,
            FI_NVLINK_THROUGHPUT_DATA_RX: (VALUE_ULONGLONG, t.nvlink_rx_kib)
            if nvlink
            else Ret.NOT_SUPPORTED,
        }
        for field_id, slot in (
            (FI_REMAPPED_COR, 0),
            (FI_REMAPPED_UNC, 1),
            (FI_REMAPPED_PENDING, 2),
            (FI_REMAPPED_FAILURE, 3),
        ):
            fields[field_id] = (
                Ret.NOT_SUPPORTED if remapped is None else (VALUE_UINT, remapped[slot])
            )
        return fields

    def _nvmlDeviceGetFieldValues(self, handle: int | None, count: int, addr: int | None) -> int:
        """Each entry gets its own return code; the call itself succeeds (nvml.h)."""
        found = self._device_call("nvmlDeviceGetFieldValues", handle)
        if isinstance(found, int):
            return found
        if addr is None or count <= 0:
            return Ret.INVALID_ARGUMENT
        fields = self._fields_of(found[1])
        stamp = int(self.clock() * 1_000_000)
        for entry in (FieldValue * count).from_address(addr):
            answer = fields.get(entry.fieldId, Ret.INVALID_ARGUMENT)
            if entry.fieldId in (FI_NVLINK_THROUGHPUT_DATA_TX, FI_NVLINK_THROUGHPUT_DATA_RX) and (
                entry.scopeId != NO_INSTANCE
            ):
                answer = Ret.INVALID_ARGUMENT  # the fake serves only the sum over all links
            entry.timestamp, entry.latencyUsec = stamp, 0
            if isinstance(answer, tuple):
                entry.nvmlReturn = Ret.SUCCESS
                entry.valueType, value = answer
                if entry.valueType == VALUE_DOUBLE:
                    entry.value.dVal = value
                elif entry.valueType == VALUE_ULONGLONG:
                    entry.value.ullVal = int(value)
                else:
                    entry.value.uiVal = int(value)
            else:
                entry.nvmlReturn = answer
        return Ret.SUCCESS

    def _nvmlDeviceGetClockInfo(self, handle: int | None, kind: int, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetClockInfo", handle)
        if isinstance(found, int):
            return found
        t = found[1].telemetry
        clocks = {
            CLOCK_GRAPHICS: t.sm_clock_mhz,
            CLOCK_SM: t.sm_clock_mhz,
            CLOCK_MEM: t.mem_clock_mhz,
            CLOCK_VIDEO: t.sm_clock_mhz * 9 // 10,
        }
        if kind not in clocks:
            return Ret.INVALID_ARGUMENT
        return self._put(c_uint, addr, clocks[kind])

    def _nvmlDeviceGetTemperature(self, handle: int | None, sensor: int, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetTemperature", handle)
        if isinstance(found, int):
            return found
        if sensor != TEMPERATURE_GPU:
            return Ret.INVALID_ARGUMENT
        return self._put(c_uint, addr, found[1].telemetry.gpu_temp_c)

    def _nvmlDeviceGetTemperatureV(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetTemperatureV", handle)
        if isinstance(found, int):
            return found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        info = TemperatureV1.from_address(addr)
        if info.version != TEMPERATURE_V1:
            return Ret.ARGUMENT_VERSION_MISMATCH
        if info.sensorType != TEMPERATURE_GPU:
            return Ret.INVALID_ARGUMENT
        info.temperature = found[1].telemetry.gpu_temp_c
        return Ret.SUCCESS

    def _nvmlDeviceGetPowerUsage(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetPowerUsage", handle)
        if isinstance(found, int):
            return found
        return self._put(c_uint, addr, found[1].telemetry.power_mw)

    def _whole_gpu(self, name: str, handle: int | None) -> tuple[int, FakeGpu] | int:
        """A GPU handle for a call NVML does not support on MIG-enabled GPUs."""
        found = self._device_call(name, handle)
        if isinstance(found, int):
            return found
        return Ret.NOT_SUPPORTED if found[1].mig_enabled else found

    def _nvmlDeviceGetUtilizationRates(self, handle: int | None, addr: int | None) -> int:
        found = self._whole_gpu("nvmlDeviceGetUtilizationRates", handle)
        if isinstance(found, int):
            return found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        util = Utilization.from_address(addr)
        util.gpu, util.memory = found[1].telemetry.gpu_util, found[1].telemetry.mem_util
        return Ret.SUCCESS

    def _codec(self, name: str, handle: int | None, util: int | None, period: int | None) -> int:
        found = self._whole_gpu(name, handle)
        if isinstance(found, int):
            return found
        t = found[1].telemetry
        self._put(c_uint, period, 167_000)
        return self._put(c_uint, util, t.enc_util if "Encoder" in name else t.dec_util)

    def _nvmlDeviceGetEncoderUtilization(
        self, handle: int | None, util: int | None, period: int | None
    ) -> int:
        return self._codec("nvmlDeviceGetEncoderUtilization", handle, util, period)

    def _nvmlDeviceGetDecoderUtilization(
        self, handle: int | None, util: int | None, period: int | None
    ) -> int:
        return self._codec("nvmlDeviceGetDecoderUtilization", handle, util, period)

    def _nvmlDeviceGetMemoryInfo_v2(self, handle: int | None, addr: int | None) -> int:
        """A GPU's memory, or on a MIG device handle its GPU instance's (what DCGM reads)."""
        found = self._any_device("nvmlDeviceGetMemoryInfo_v2", handle)
        if isinstance(found, int):
            return found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        mem = MemoryV2.from_address(addr)
        if mem.version != MEMORY_V2:
            return Ret.ARGUMENT_VERSION_MISMATCH
        _, gpu, ci = found
        t = gpu.telemetry
        if ci is None:
            total, used, reserved = gpu.memory_mib, t.used_mib, t.reserved_mib
        else:
            gi_id = self._mig_handles[ci.mig_handle][1]
            family, gi = gpu.family, gpu.gpu_instances[gi_id]
            profile = self._gi_profile(gpu, gi.profile_id)
            assert family is not None and profile is not None
            total = self._memory_mib(family, profile)
            used, reserved = t.instance_used_mib.get(gi_id, 0), t.instance_reserved_mib
        mem.total, mem.used, mem.reserved = total * 2**20, used * 2**20, reserved * 2**20
        mem.free = mem.total - mem.used - mem.reserved
        return Ret.SUCCESS

    def _nvmlDeviceGetGridLicensableFeatures_v4(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetGridLicensableFeatures_v4", handle)
        if isinstance(found, int):
            return found
        t = found[1].telemetry
        if t.grid_license_supported is None:
            return Ret.NOT_SUPPORTED
        if addr is None:
            return Ret.INVALID_ARGUMENT
        info = GridLicensableFeaturesV4.from_address(addr)
        info.isGridLicenseSupported = int(t.grid_license_supported)
        info.licensableFeaturesCount = 1 if t.grid_license_supported else 0
        feature = info.gridLicensableFeatures[0]
        feature.featureCode = GRID_LICENSE_FEATURE_CODE_VGPU
        feature.featureState = 1 if t.vgpu_licensed else 0
        return Ret.SUCCESS

    # ---- GPM -------------------------------------------------------------------------------------

    def _nvmlGpmQueryDeviceSupport(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlGpmQueryDeviceSupport", handle)
        if isinstance(found, int):
            return found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        support = GpmSupport.from_address(addr)
        if support.version != GPM_SUPPORT_VERSION:
            return Ret.ARGUMENT_VERSION_MISMATCH
        support.isSupportedDevice = 0 if found[1].telemetry.gpm is None else 1
        return Ret.SUCCESS

    def _nvmlGpmSampleAlloc(self, out: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        with self._lock:
            handle = self._new_handle("gpm")
            self.gpm_samples[handle] = None
        return self._put(c_void_p, out, handle)

    def _nvmlGpmSampleFree(self, sample: int | None) -> int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        with self._lock:
            if sample not in self.gpm_samples:
                return Ret.INVALID_ARGUMENT
            del self.gpm_samples[sample]
        return Ret.SUCCESS

    def _take_sample(
        self, name: str, handle: int | None, gi: int | None, sample: int | None
    ) -> int:
        found = self._device_call(name, handle)
        if isinstance(found, int):
            return found
        index, gpu = found
        if gpu.telemetry.gpm is None:
            return Ret.NOT_SUPPORTED
        if sample not in self.gpm_samples:
            return Ret.INVALID_ARGUMENT
        if gi is not None and not (gpu.mig_enabled and gi in gpu.gpu_instances):
            return Ret.INVALID_ARGUMENT
        with self._lock:
            self._gpm_seq += 1
            self.gpm_samples[sample] = GpmSample(index, gi, self._gpm_seq)
        return Ret.SUCCESS

    def _nvmlGpmSampleGet(self, handle: int | None, sample: int | None) -> int:
        return self._take_sample("nvmlGpmSampleGet", handle, None, sample)

    def _nvmlGpmMigSampleGet(self, handle: int | None, gi: int, sample: int | None) -> int:
        return self._take_sample("nvmlGpmMigSampleGet", handle, gi, sample)

    def _nvmlGpmMetricsGet(self, addr: int | None) -> int:
        """Metrics between two samples of the same GPU (or instance), the later one second."""
        if not self.init_count:
            return Ret.UNINITIALIZED
        if addr is None:
            return Ret.INVALID_ARGUMENT
        request = GpmMetricsGet.from_address(addr)
        if request.version != GPM_METRICS_GET_VERSION:
            return Ret.ARGUMENT_VERSION_MISMATCH
        first = self.gpm_samples.get(request.sample1)
        second = self.gpm_samples.get(request.sample2)
        if (
            first is None
            or second is None
            or (first.gpu, first.gi) != (second.gpu, second.gi)
            or first.seq >= second.seq
            or not 0 < request.numMetrics <= GPM_METRIC_MAX
        ):
            return Ret.INVALID_ARGUMENT
        t = self.gpus[second.gpu].telemetry
        measured = (t.gpm or {}) if second.gi is None else t.instance_gpm.get(second.gi, {})
        for metric in request.metrics[: request.numMetrics]:
            if metric.metricId in measured:
                metric.nvmlReturn, metric.value = Ret.SUCCESS, measured[metric.metricId]
            else:
                metric.nvmlReturn = Ret.NOT_SUPPORTED
        return Ret.SUCCESS

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

    # ---- MIG: handle resolution ------------------------------------------------------------------

    def _new_handle(self, kind: str) -> int:
        handle = self._next_handle[kind]
        self._next_handle[kind] += 0x10
        return handle

    def _parent_checks(self, name: str, index: int) -> tuple[int, FakeGpu] | int:
        gpu = self.gpus[index]
        if name in gpu.errors:
            return gpu.errors[name]
        if gpu.lost:
            return Ret.GPU_IS_LOST
        return index, gpu

    def _any_device(
        self, name: str, handle: int | None
    ) -> tuple[int, FakeGpu, FakeComputeInstance | None] | int:
        """A GPU handle or a MIG device handle: the GPU, plus the CI when it is a MIG device."""
        if not self.init_count:
            return Ret.UNINITIALIZED
        if handle in self._mig_handles:
            index, gi_id, ci_id = self._mig_handles[handle]
            found = self._parent_checks(name, index)
            if isinstance(found, int):
                return found
            gpu = found[1]
            return index, gpu, gpu.gpu_instances[gi_id].compute_instances[ci_id]
        dev = self._device_call(name, handle)
        if isinstance(dev, int):
            return dev
        return dev[0], dev[1], None

    def _gi(self, name: str, handle: int | None) -> tuple[int, FakeGpu, FakeGpuInstance] | int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        key = self._gi_handles.get(handle) if handle is not None else None
        if key is None:
            return Ret.INVALID_ARGUMENT  # never created, destroyed, or wiped by a reset
        found = self._parent_checks(name, key[0])
        if isinstance(found, int):
            return found
        return key[0], found[1], found[1].gpu_instances[key[1]]

    def _ci(
        self, name: str, handle: int | None
    ) -> tuple[int, FakeGpu, FakeGpuInstance, FakeComputeInstance] | int:
        if not self.init_count:
            return Ret.UNINITIALIZED
        key = self._ci_handles.get(handle) if handle is not None else None
        if key is None:
            return Ret.INVALID_ARGUMENT
        found = self._parent_checks(name, key[0])
        if isinstance(found, int):
            return found
        gi = found[1].gpu_instances[key[1]]
        return key[0], found[1], gi, gi.compute_instances[key[2]]

    def _mig_device(self, name: str, handle: int | None) -> tuple[int, FakeGpu] | int:
        """A GPU handle for a MIG call: NOT_SUPPORTED unless the board can do MIG."""
        found = self._device_call(name, handle)
        if isinstance(found, int):
            return found
        if found[1].family is None:
            return Ret.NOT_SUPPORTED
        return found

    @staticmethod
    def _gi_profile(gpu: FakeGpu, profile_id: int) -> GiProfile | None:
        family = gpu.family
        if family is None:
            return None
        return next((p for p in family.profiles if p.profile_id == profile_id), None)

    @staticmethod
    def _ci_profile(gpu: FakeGpu, gi: FakeGpuInstance, ci_profile_id: int) -> CiProfile | None:
        profile = FakeNvml._gi_profile(gpu, gi.profile_id)
        if profile is None:
            return None
        return next((c for c in profile.compute_profiles if c.profile_id == ci_profile_id), None)

    @staticmethod
    def _memory_mib(family: Family, profile: GiProfile) -> int:
        """The catalog's memory size; where it has none (A100-80GB 1g.20gb), that of a profile
        with as many memory slices, which is what the driver reports for the other boards."""
        if profile.memory_mib:
            return profile.memory_mib
        for other in family.profiles:
            if other.memory_slices == profile.memory_slices and other.memory_mib:
                return other.memory_mib
        return 0

    def _drop_gpu_instance(self, index: int, gi_id: int) -> None:
        gi = self.gpus[index].gpu_instances.pop(gi_id)
        for ci_id in list(gi.compute_instances):
            self._drop_compute_instance(gi, ci_id)
        self._gi_handles.pop(gi.handle, None)

    def _drop_compute_instance(self, gi: FakeGpuInstance, ci_id: int) -> None:
        ci = gi.compute_instances.pop(ci_id)
        self._ci_handles.pop(ci.handle, None)
        self._mig_handles.pop(ci.mig_handle, None)

    # ---- MIG: mode -------------------------------------------------------------------------------

    def _nvmlDeviceSetMigMode(self, handle: int | None, mode: int, status: int | None) -> int:
        found = self._mig_device("nvmlDeviceSetMigMode", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        if mode not in (MIG_DISABLE, MIG_ENABLE) or status is None:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires root user"
            return Ret.NO_PERMISSION
        assert gpu.mig is not None and gpu.family is not None
        with self._lock:
            current = gpu.mig[0]
            gpu.mig = (current, mode)
            if mode == current:
                activation = Ret.SUCCESS
            elif gpu.processes or (mode == MIG_DISABLE and gpu.gpu_instances):
                activation = Ret.IN_USE  # pending until the board is idle and reset
            elif gpu.activation_status != Ret.SUCCESS:
                activation = gpu.activation_status
            else:
                activation = Ret.SUCCESS
                if not gpu.family.mode_change_needs_reset:
                    gpu.mig = (mode, mode)
        return self._put(c_int, status, activation)

    # ---- MIG: GPU instance profiles --------------------------------------------------------------

    def _gi_profile_lookup(
        self, name: str, handle: int | None, enum: int, addr: int | None
    ) -> tuple[Family, GiProfile] | int:
        found = self._device_call(name, handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        if enum >= GI_PROFILE_COUNT or addr is None:
            return Ret.INVALID_ARGUMENT
        family = gpu.family
        if family is None or not gpu.mig_enabled:
            return Ret.NOT_SUPPORTED  # "doesn't have MIG mode enabled or profile isn't supported"
        by_enum = {e: pid for pid, e in family.enums.items()}
        profile = self._gi_profile(gpu, by_enum.get(enum, -1))
        if profile is None:
            return Ret.NOT_SUPPORTED
        return family, profile

    def _fill_gi_profile(self, info: Any, family: Family, profile: GiProfile) -> None:
        info.id = profile.profile_id
        info.isP2pSupported = 0
        info.sliceCount = profile.slices
        info.instanceCount = profile.max_count
        # Engine and SM counts are not in the catalog and nothing in gpud reads them.
        info.memorySizeMB = self._memory_mib(family, profile)

    def _nvmlDeviceGetGpuInstanceProfileInfo(
        self, handle: int | None, enum: int, addr: int | None
    ) -> int:
        found = self._gi_profile_lookup("nvmlDeviceGetGpuInstanceProfileInfo", handle, enum, addr)
        if isinstance(found, int):
            return found
        assert addr is not None
        info = GpuInstanceProfileInfo.from_address(addr)
        self._fill_gi_profile(info, *found)
        return Ret.SUCCESS

    def _nvmlDeviceGetGpuInstanceProfileInfoV(
        self, handle: int | None, enum: int, addr: int | None
    ) -> int:
        found = self._gi_profile_lookup("nvmlDeviceGetGpuInstanceProfileInfoV", handle, enum, addr)
        if isinstance(found, int):
            return found
        assert addr is not None
        info = GpuInstanceProfileInfoV2.from_address(addr)
        if info.version != GI_PROFILE_INFO_V2:
            return Ret.INVALID_ARGUMENT  # "info->version are invalid"
        self._fill_gi_profile(info, *found)
        info.name = f"MIG {found[1].name}".encode()
        return Ret.SUCCESS

    def _nvmlDeviceGetGpuInstancePossiblePlacements_v2(
        self, handle: int | None, profile_id: int, addr: int | None, count: int | None
    ) -> int:
        found = self._mig_device("nvmlDeviceGetGpuInstancePossiblePlacements_v2", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        if count is None:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        if not gpu.mig_enabled:
            # The 12.2 header lists NOT_SUPPORTED "if device doesn't have MIG mode enabled"; newer
            # headers say all placements come back regardless. The fake takes the stricter one.
            return Ret.NOT_SUPPORTED
        profile = self._gi_profile(gpu, profile_id)
        if profile is None:
            return Ret.INVALID_ARGUMENT
        places = profile.placements
        capacity = c_uint.from_address(count)
        if addr is not None:
            # "If non-NULL must be large enough": the fake holds the caller to the count it passed.
            if capacity.value < len(places):
                return Ret.INSUFFICIENT_SIZE
            array = (GpuInstancePlacement * len(places)).from_address(addr)
            for slot, place in zip(array, places, strict=True):
                slot.start, slot.size = place.start, place.size
        capacity.value = len(places)
        return Ret.SUCCESS

    # ---- MIG: GPU instances ----------------------------------------------------------------------

    def _nvmlDeviceCreateGpuInstanceWithPlacement(
        self, handle: int | None, profile_id: int, placement: int | None, out: int | None
    ) -> int:
        found = self._mig_device("nvmlDeviceCreateGpuInstanceWithPlacement", handle)
        if isinstance(found, int):
            return found
        index, gpu = found
        if placement is None or out is None:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        if not gpu.mig_enabled:
            return Ret.NOT_SUPPORTED
        family = gpu.family
        profile = self._gi_profile(gpu, profile_id)
        if family is None or profile is None:
            return Ret.INVALID_ARGUMENT
        want = GpuInstancePlacement.from_address(placement)
        start, size = want.start, want.size
        if not any(p.start == start and p.size == size for p in profile.placements):
            return Ret.INVALID_ARGUMENT
        with self._lock:
            existing = gpu.gpu_instances.values()
            if sum(1 for g in existing if g.profile_id == profile_id) >= profile.max_count:
                return Ret.INSUFFICIENT_RESOURCES
            if any(start < g.start + g.size and g.start < start + size for g in existing):
                return Ret.INSUFFICIENT_RESOURCES
            gi_id = next(
                (i for i in range(1, family.compute_slices + 1) if i not in gpu.gpu_instances),
                None,
            )
            if gi_id is None:
                return Ret.INSUFFICIENT_RESOURCES
            gi = FakeGpuInstance(gi_id, profile_id, start, size, self._new_handle("gi"))
            gpu.gpu_instances[gi_id] = gi
            self._gi_handles[gi.handle] = (index, gi_id)
        return self._put(c_void_p, out, gi.handle)

    def _nvmlGpuInstanceDestroy(self, handle: int | None) -> int:
        found = self._gi("nvmlGpuInstanceDestroy", handle)
        if isinstance(found, int):
            return found
        index, gpu, gi = found
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        with self._lock:
            if gi.compute_instances or any(p.gi == gi.gi_id for p in gpu.processes):
                return Ret.IN_USE
            self._drop_gpu_instance(index, gi.gi_id)
        return Ret.SUCCESS

    def _nvmlDeviceGetGpuInstances(
        self, handle: int | None, profile_id: int, addr: int | None, count: int | None
    ) -> int:
        found = self._mig_device("nvmlDeviceGetGpuInstances", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        if addr is None or count is None:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        if not gpu.mig_enabled:
            return Ret.NOT_SUPPORTED
        if self._gi_profile(gpu, profile_id) is None:
            return Ret.INVALID_ARGUMENT
        # The caller sized the array by the profile's instanceCount, as the header asks.
        handles = [
            g.handle for _, g in sorted(gpu.gpu_instances.items()) if g.profile_id == profile_id
        ]
        array = (c_void_p * max(len(handles), 1)).from_address(addr)
        for slot, gi_handle in enumerate(handles):
            array[slot] = gi_handle
        return self._put(c_uint, count, len(handles))

    def _nvmlDeviceGetGpuInstanceById(self, handle: int | None, gi_id: int, out: int | None) -> int:
        found = self._mig_device("nvmlDeviceGetGpuInstanceById", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        if out is None:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        if not gpu.mig_enabled:
            return Ret.NOT_SUPPORTED
        gi = gpu.gpu_instances.get(gi_id)
        if gi is None:
            return Ret.NOT_FOUND
        return self._put(c_void_p, out, gi.handle)

    def _nvmlGpuInstanceGetInfo(self, handle: int | None, addr: int | None) -> int:
        found = self._gi("nvmlGpuInstanceGetInfo", handle)
        if isinstance(found, int):
            return found
        index, _, gi = found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        info = GpuInstanceInfo.from_address(addr)
        info.device = self.handle_of(index)
        info.id, info.profileId = gi.gi_id, gi.profile_id
        info.placement.start, info.placement.size = gi.start, gi.size
        return Ret.SUCCESS

    # ---- MIG: compute instances ------------------------------------------------------------------

    def _ci_profile_lookup(
        self, name: str, handle: int | None, enum: int, engine: int, addr: int | None
    ) -> tuple[GiProfile, CiProfile] | int:
        found = self._gi(name, handle)
        if isinstance(found, int):
            return found
        _, gpu, gi = found
        if enum >= CI_PROFILE_COUNT or engine >= CI_ENGINE_PROFILE_COUNT or addr is None:
            return Ret.INVALID_ARGUMENT
        gi_profile = self._gi_profile(gpu, gi.profile_id)
        # Observed drivers give every CI profile the ID of its enum (mig-profiles.md §1.3).
        ci_profile = self._ci_profile(gpu, gi, enum)
        if gi_profile is None or ci_profile is None:
            return Ret.NOT_SUPPORTED
        return gi_profile, ci_profile

    @staticmethod
    def _fill_ci_profile(info: Any, ci_profile: CiProfile) -> None:
        info.id = ci_profile.profile_id
        info.sliceCount = ci_profile.slices
        info.instanceCount = ci_profile.max_count

    def _nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, handle: int | None, enum: int, engine: int, addr: int | None
    ) -> int:
        found = self._ci_profile_lookup(
            "nvmlGpuInstanceGetComputeInstanceProfileInfo", handle, enum, engine, addr
        )
        if isinstance(found, int):
            return found
        assert addr is not None
        self._fill_ci_profile(ComputeInstanceProfileInfo.from_address(addr), found[1])
        return Ret.SUCCESS

    def _nvmlGpuInstanceGetComputeInstanceProfileInfoV(
        self, handle: int | None, enum: int, engine: int, addr: int | None
    ) -> int:
        found = self._ci_profile_lookup(
            "nvmlGpuInstanceGetComputeInstanceProfileInfoV", handle, enum, engine, addr
        )
        if isinstance(found, int):
            return found
        assert addr is not None
        info = ComputeInstanceProfileInfoV2.from_address(addr)
        if info.version != CI_PROFILE_INFO_V2:
            return Ret.INVALID_ARGUMENT
        self._fill_ci_profile(info, found[1])
        info.name = f"MIG {found[1].name}".encode()
        return Ret.SUCCESS

    def _nvmlGpuInstanceCreateComputeInstance(
        self, handle: int | None, ci_profile_id: int, out: int | None
    ) -> int:
        found = self._gi("nvmlGpuInstanceCreateComputeInstance", handle)
        if isinstance(found, int):
            return found
        index, gpu, gi = found
        if out is None or ci_profile_id >= CI_PROFILE_COUNT:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        gi_profile = self._gi_profile(gpu, gi.profile_id)
        ci_profile = self._ci_profile(gpu, gi, ci_profile_id)
        family = gpu.family
        if gi_profile is None or ci_profile is None or family is None:
            return Ret.NOT_SUPPORTED
        with self._lock:
            cis = gi.compute_instances.values()
            if sum(1 for c in cis if c.profile_id == ci_profile_id) >= ci_profile.max_count:
                return Ret.INSUFFICIENT_RESOURCES
            used = {s for c in cis for s in range(c.start, c.start + c.slices)}
            width = ci_profile.slices
            start = next(
                (
                    s
                    for s in range(0, gi_profile.slices - width + 1, width)
                    if used.isdisjoint(range(s, s + width))
                ),
                None,
            )
            if start is None:
                return Ret.INSUFFICIENT_RESOURCES
            ci_id = next(
                i for i in range(len(gi.compute_instances) + 1) if i not in gi.compute_instances
            )
            taken = {
                c.slot for g in gpu.gpu_instances.values() for c in g.compute_instances.values()
            }
            slot = next(i for i in range(family.compute_slices) if i not in taken)
            ci = FakeComputeInstance(
                ci_id=ci_id,
                profile_id=ci_profile_id,
                slices=width,
                start=start,
                uuid=f"MIG-{uuidlib.uuid4()}",
                slot=slot,
                handle=self._new_handle("ci"),
                mig_handle=self._new_handle("mig"),
            )
            gi.compute_instances[ci_id] = ci
            self._ci_handles[ci.handle] = (index, gi.gi_id, ci_id)
            self._mig_handles[ci.mig_handle] = (index, gi.gi_id, ci_id)
        return self._put(c_void_p, out, ci.handle)

    def _nvmlComputeInstanceDestroy(self, handle: int | None) -> int:
        found = self._ci("nvmlComputeInstanceDestroy", handle)
        if isinstance(found, int):
            return found
        _, gpu, gi, ci = found
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        with self._lock:
            if any(p.gi == gi.gi_id and p.ci == ci.ci_id for p in gpu.processes):
                return Ret.IN_USE
            self._drop_compute_instance(gi, ci.ci_id)
        return Ret.SUCCESS

    def _nvmlGpuInstanceGetComputeInstances(
        self, handle: int | None, ci_profile_id: int, addr: int | None, count: int | None
    ) -> int:
        found = self._gi("nvmlGpuInstanceGetComputeInstances", handle)
        if isinstance(found, int):
            return found
        _, gpu, gi = found
        if addr is None or count is None or ci_profile_id >= CI_PROFILE_COUNT:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        if self._ci_profile(gpu, gi, ci_profile_id) is None:
            return Ret.NOT_SUPPORTED
        handles = [
            c.handle
            for _, c in sorted(gi.compute_instances.items())
            if c.profile_id == ci_profile_id
        ]
        array = (c_void_p * max(len(handles), 1)).from_address(addr)
        for slot, ci_handle in enumerate(handles):
            array[slot] = ci_handle
        return self._put(c_uint, count, len(handles))

    def _nvmlGpuInstanceGetComputeInstanceById(
        self, handle: int | None, ci_id: int, out: int | None
    ) -> int:
        found = self._gi("nvmlGpuInstanceGetComputeInstanceById", handle)
        if isinstance(found, int):
            return found
        gi = found[2]
        if out is None:
            return Ret.INVALID_ARGUMENT
        if not self.root:  # "Requires privileged user"
            return Ret.NO_PERMISSION
        ci = gi.compute_instances.get(ci_id)
        if ci is None:
            return Ret.NOT_FOUND
        return self._put(c_void_p, out, ci.handle)

    def _nvmlComputeInstanceGetInfo_v2(self, handle: int | None, addr: int | None) -> int:
        found = self._ci("nvmlComputeInstanceGetInfo_v2", handle)
        if isinstance(found, int):
            return found
        index, _, gi, ci = found
        if addr is None:
            return Ret.INVALID_ARGUMENT
        info = ComputeInstanceInfo.from_address(addr)
        info.device, info.gpuInstance = self.handle_of(index), gi.handle
        info.id, info.profileId = ci.ci_id, ci.profile_id
        info.placement.start, info.placement.size = ci.start, ci.slices
        return Ret.SUCCESS

    # ---- MIG: MIG device handles -----------------------------------------------------------------

    def _nvmlDeviceIsMigDeviceHandle(self, handle: int | None, addr: int | None) -> int:
        found = self._any_device("nvmlDeviceIsMigDeviceHandle", handle)
        if isinstance(found, int):
            return found
        return self._put(c_uint, addr, 0 if found[2] is None else 1)

    def _instance_id(self, name: str, handle: int | None, addr: int | None, gi: bool) -> int:
        found = self._any_device(name, handle)
        if isinstance(found, int):
            return found
        ci = found[2]
        if ci is None:
            return Ret.NOT_SUPPORTED  # a GPU handle has no instance IDs
        gi_id, ci_id = self._mig_handles[ci.mig_handle][1:]
        return self._put(c_uint, addr, gi_id if gi else ci_id)

    def _nvmlDeviceGetGpuInstanceId(self, handle: int | None, addr: int | None) -> int:
        return self._instance_id("nvmlDeviceGetGpuInstanceId", handle, addr, gi=True)

    def _nvmlDeviceGetComputeInstanceId(self, handle: int | None, addr: int | None) -> int:
        return self._instance_id("nvmlDeviceGetComputeInstanceId", handle, addr, gi=False)

    def _nvmlDeviceGetMaxMigDeviceCount(self, handle: int | None, addr: int | None) -> int:
        found = self._device_call("nvmlDeviceGetMaxMigDeviceCount", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        # "Returns zero if MIG is not supported or enabled."
        family = gpu.family
        return self._put(c_uint, addr, family.compute_slices if gpu.mig_enabled and family else 0)

    def _nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: int | None, slot: int, out: int | None
    ) -> int:
        found = self._mig_device("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if isinstance(found, int):
            return found
        gpu = found[1]
        family = gpu.family
        if not gpu.mig_enabled or family is None:
            return Ret.NOT_SUPPORTED
        if out is None or slot >= family.compute_slices:
            return Ret.INVALID_ARGUMENT
        for gi in gpu.gpu_instances.values():
            for ci in gi.compute_instances.values():
                if ci.slot == slot:
                    return self._put(c_void_p, out, ci.mig_handle)
        return Ret.NOT_FOUND

    def _nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
        self, handle: int | None, out: int | None
    ) -> int:
        found = self._any_device("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        if isinstance(found, int):
            return found
        if found[2] is None:
            return Ret.INVALID_ARGUMENT
        return self._put(c_void_p, out, self.handle_of(found[0]))

    # ---- processes -------------------------------------------------------------------------------

    def _running(self, name: str, handle: int | None, count: int | None, addr: int | None) -> int:
        found = self._any_device(name, handle)
        if isinstance(found, int):
            return found
        _, gpu, ci = found
        if count is None:
            return Ret.INVALID_ARGUMENT
        procs = list(gpu.processes)
        if ci is not None:
            gi_id = self._mig_handles[ci.mig_handle][1]
            procs = [p for p in procs if (p.gi, p.ci) == (gi_id, ci.ci_id)]
        elif gpu.mig_enabled and not self.root:
            # The aggregate over MIG devices comes "only if the caller has appropriate
            # privileges"; the fake's reading of the rest: only whole-GPU processes.
            procs = [p for p in procs if p.gi == NO_INSTANCE]
        capacity = c_uint.from_address(count)
        if addr is None or capacity.value < len(procs):
            # "call with *infoCount = 0 ... INSUFFICIENT_SIZE, or SUCCESS if none are running"
            capacity.value = len(procs)
            return Ret.INSUFFICIENT_SIZE if procs else Ret.SUCCESS
        array = (ProcessInfo * max(len(procs), 1)).from_address(addr)
        for slot, proc in zip(array, procs, strict=False):
            slot.pid = proc.pid
            slot.usedGpuMemory = proc.used_mib * 1024 * 1024
            slot.gpuInstanceId, slot.computeInstanceId = proc.gi, proc.ci
        capacity.value = len(procs)
        return Ret.SUCCESS

    def _nvmlDeviceGetComputeRunningProcesses_v3(
        self, handle: int | None, count: int | None, addr: int | None
    ) -> int:
        return self._running("nvmlDeviceGetComputeRunningProcesses_v3", handle, count, addr)

    def _nvmlDeviceGetComputeRunningProcesses_v2(
        self, handle: int | None, count: int | None, addr: int | None
    ) -> int:
        return self._running("nvmlDeviceGetComputeRunningProcesses_v2", handle, count, addr)


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


DGX_H100_BUS_IDS = [
    f"00000000:{bus:02X}:00.0" for bus in (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
]


def h100_telemetry() -> FakeTelemetry:
    """An H100 SXM at work: Hopper, so GPM answers; HBM3, so memory temperature too."""
    return FakeTelemetry(
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        gpu_temp_c=52,
        memory_temp_c=61,
        power_mw=512_345,
        used_mib=40_000,
        reserved_mib=612,
        gpm=hopper_gpm(),
    )


def dgx_h100(**kwargs: Any) -> FakeNvml:
    """Eight H100 80GB HBM3 on NVSwitches (18 NVLinks each), with GPM."""
    gpus = [
        FakeGpu(
            uuid=f"GPU-{index:x}2b3c4d5-6e7f-8091-a2b3-c4d5e6f7a8{index:02x}",
            name="NVIDIA H100 80GB HBM3",
            bus_id=bus,
            pci_device_id=0x233010DE,
            pci_subsystem_id=0x16C110DE,
            memory_mib=81559,
            minor=index,
            numa=0 if index < 4 else 1,
            nvlinks=[FakeLink(switch=link % 4) for link in range(18)],
            telemetry=h100_telemetry(),
        )
        for index, bus in enumerate(DGX_H100_BUS_IDS)
    ]
    return FakeNvml(gpus, switches=DGX_A100_SWITCHES[:4], **kwargs)


def t4(**kwargs: Any) -> FakeNvml:
    """One Tesla T4: no MIG, no NVLink, no NUMA affinity reported (single socket / VM); GDDR6,
    so no memory temperature; Turing, so no row remapping and no GPM."""
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
        compute_capability=(7, 5),
        nvlinks=None,
        telemetry=FakeTelemetry(
            sm_clock_mhz=1590,
            mem_clock_mhz=5000,
            gpu_temp_c=38,
            memory_temp_c=None,
            power_mw=27_891,
            used_mib=2_048,
            reserved_mib=250,
            remapped=None,
        ),
    )
    return FakeNvml([gpu], **kwargs)
