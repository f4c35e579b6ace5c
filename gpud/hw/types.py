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
