"""Value types the hardware layer hands upwards.

They are frozen so that decisions above ``hw`` (resource sets, preferred allocation, the MIG
planner) can be pure functions over them, and so that two snapshots compare equal exactly when the
hardware looks the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MigMode(enum.Enum):
    """MIG mode as NVML reports it; ``UNSUPPORTED`` when the board cannot do MIG."""

    UNSUPPORTED = "unsupported"
    DISABLED = "disabled"
    ENABLED = "enabled"


@dataclass(frozen=True, slots=True)
class MigState:
    """Current and pending MIG mode: they differ until the GPU is reset (Ampere) or re-read."""

    current: MigMode
    pending: MigMode

    @property
    def capable(self) -> bool:
        return self.current is not MigMode.UNSUPPORTED

    def describe(self) -> str:
        if self.pending is not self.current:
            return f"{self.current.value} (pending: {self.pending.value})"
        return self.current.value


MIG_UNSUPPORTED = MigState(MigMode.UNSUPPORTED, MigMode.UNSUPPORTED)


@dataclass(frozen=True, slots=True)
class NvLinkPeer:
    """A GPU reachable over NVLink (directly or through NVSwitch) and how many links lead to it."""

    uuid: str
    links: int


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One physical GPU as NVML describes it.

    ``pci_device_id`` is NVML's combined ``pciDeviceId`` (device << 16 | vendor, e.g. 0x20B010DE
    for an A100-SXM4-40GB), the number mig-parted's ``device-filter`` matches. ``numa_node`` is
    None when the platform reports no affinity (single-socket machines, some VMs).
    """

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    pci_device_id: int
    memory_mib: int
    minor_number: int
    numa_node: int | None
    mig: MigState = MIG_UNSUPPORTED
    nvlink_peers: tuple[NvLinkPeer, ...] = ()
    # PCIe switch the GPU hangs off, as an opaque group key; GPUs sharing one talk without
    # crossing the CPU. None when unknown.
    pcie_switch: str | None = None
    # NVML answered GPU_IS_LOST for this board: it fell off the bus and needs a reset or reboot.
    lost: bool = False
    # CUDA compute capability (major, minor), e.g. (8, 0) for an A100; None when NVML cannot tell.
    # Node labels derive the GPU family from it, as GPU Feature Discovery does.
    compute_capability: tuple[int, int] | None = None

    @property
    def device_path(self) -> str:
        return f"/dev/nvidia{self.minor_number}"

    @property
    def pci_device_id_hex(self) -> str:
        """The ``0xDDDDVVVV`` form mig-parted configs use."""
        return f"0x{self.pci_device_id:08X}"

    def nvlinks_to(self, uuid: str) -> int:
        for peer in self.nvlink_peers:
            if peer.uuid == uuid:
                return peer.links
        return 0


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """Driver-wide facts; the versions are empty strings when the backend cannot tell."""

    backend: str
    driver_version: str = ""
    cuda_version: str = ""
    nvml_version: str = ""


class EventKind(enum.Enum):
    XID = "xid"
    GPU_LOST = "gpu-lost"


# NVML's "not tied to a GPU or compute instance" marker in event data.
NO_INSTANCE = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class HwEvent:
    """A health-relevant event from the hardware.

    ``gi_id``/``ci_id`` narrow an XID to one MIG instance; ``NO_INSTANCE`` means the whole GPU.
    """

    kind: EventKind
    uuid: str
    xid: int = 0
    gi_id: int = NO_INSTANCE
    ci_id: int = NO_INSTANCE
    detail: str = field(default="", compare=False)


# ---- MIG -------------------------------------------------------------------------------------
# The shapes NVML reports for MIG. Profile facts are read from the backend at run time (NVML's
# numbers change with the driver); nothing above hw/ hard-codes a profile table for a real GPU.


@dataclass(frozen=True, slots=True, order=True)
class Placement:
    """A GPU instance's position in MEMORY-slice units, as NVML's placement struct has it."""

    start: int
    size: int

    def overlaps(self, other: Placement) -> bool:
        return self.start < other.start + other.size and other.start < self.start + self.size

    def __str__(self) -> str:
        return f"{self.start}:{self.size}"


@dataclass(frozen=True, slots=True)
class CiProfile:
    """A compute-instance profile inside one GI profile (``info.id`` is what create takes)."""

    profile_id: int
    slices: int
    max_count: int
    # "1c.3g.20gb" for a partial CI; the GI's own name ("3g.20gb") for the CI spanning the GI.
    name: str


@dataclass(frozen=True, slots=True)
class GiProfile:
    """A GPU-instance profile as NVML reports it on one GPU.

    ``profile_id`` is ``nvmlGpuInstanceProfileInfo_t.id`` (19 for 1g.5gb on an A100), which the
    create and placement calls take; it is not the NVML enum used to look the profile up.
    """

    profile_id: int
    name: str
    slices: int
    memory_slices: int
    memory_mib: int
    max_count: int
    placements: tuple[Placement, ...]
    compute_profiles: tuple[CiProfile, ...] = ()

    @property
    def full_ci(self) -> CiProfile | None:
        """The compute-instance profile spanning the whole GI (what "2g.10gb" means)."""
        for ci in self.compute_profiles:
            if ci.slices == self.slices:
                return ci
        return None


@dataclass(frozen=True, slots=True)
class ComputeInstance:
    ci_id: int
    profile_id: int
    slices: int
    # Start of the CI within its GI, in compute slices.
    start: int
    # The MIG device this CI is: "MIG-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".
    mig_uuid: str


@dataclass(frozen=True, slots=True)
class GpuInstance:
    gi_id: int
    profile_id: int
    placement: Placement
    compute_instances: tuple[ComputeInstance, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process using a GPU; ``mig_uuid`` names the MIG device when it runs on one."""

    pid: int
    mig_uuid: str | None = None
    used_memory_mib: int = 0


@dataclass(frozen=True, slots=True)
class MigLayoutState:
    """Everything the MIG planner needs to know about one GPU, read in one go.

    ``profiles`` is empty for a GPU that cannot do MIG; for a MIG-capable GPU whose mode is off
    the backend still reports the profiles the board supports (see the backends for how).
    """

    index: int
    uuid: str
    pci_device_id: int
    mode: MigState
    profiles: tuple[GiProfile, ...]
    instances: tuple[GpuInstance, ...]
