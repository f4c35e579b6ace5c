"""What one device plugin advertises: a resource name and its devices.

A :class:`Device` is what kubelet schedules. For a whole GPU it is the GPU itself; for a MIG slice
(next) a MIG device; for a time-sliced replica an ``<id>::<n>`` alias of one of those. Each keeps
the facts ``Allocate`` and ``GetPreferredAllocation`` need, so the servers never go back to the
hardware layer on kubelet's hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

RESOURCE_DOMAIN = "nvidia.com"


@dataclass(frozen=True, slots=True)
class Device:
    # The ID kubelet sees (<= 63 characters): a GPU UUID, a MIG UUID or "<one of those>::<n>".
    id: str
    healthy: bool
    numa_node: int | None
    # The physical GPU behind the device: topology and health are per physical GPU.
    gpu_uuid: str
    # What the container runtime is told: the GPU or MIG UUID (a replica maps back to it).
    visible_uuid: str
    # nvidia-smi style index: "3" for a GPU, "3:1" for MIG device 1 on GPU 3.
    index: str
    # Character devices the container needs, for passDeviceSpecs.
    device_paths: tuple[str, ...] = ()
    replica: int | None = None

    @property
    def health(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY


@dataclass(frozen=True, slots=True)
class ResourceSet:
    """Everything one plugin socket serves."""

    resource: str
    devices: tuple[Device, ...]
    # Time-slicing's failRequestsGreaterThanOne: a container may take at most one replica.
    fail_requests_greater_than_one: bool = False

    @property
    def socket_name(self) -> str:
        """``nvidia-gpu.sock`` for ``nvidia.com/gpu``, as NVIDIA's plugin names them."""
        short = self.resource.split("/", 1)[-1]
        return f"nvidia-{short}.sock"

    @property
    def healthy_count(self) -> int:
        return sum(1 for d in self.devices if d.healthy)
