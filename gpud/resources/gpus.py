"""The ``nvidia.com/gpu`` resource: one device per whole physical GPU.

kubelet sees GPU UUIDs as device IDs (stable across reboots and re-enumeration, unlike indices),
each with the GPU's NUMA node so the Topology Manager can align it with CPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpud.hw.types import GpuInfo
from gpud.resources.types import RESOURCE_DOMAIN, Device, ResourceSet

GPU_RESOURCE = f"{RESOURCE_DOMAIN}/gpu"


def whole_gpu_devices(gpus: Sequence[GpuInfo], unhealthy: Mapping[str, str]) -> tuple[Device, ...]:
    return tuple(
        Device(
            id=gpu.uuid,
            healthy=gpu.uuid not in unhealthy and not gpu.lost,
            numa_node=gpu.numa_node,
            gpu_uuid=gpu.uuid,
            visible_uuid=gpu.uuid,
            index=str(gpu.index),
            device_paths=(gpu.device_path,),
        )
        for gpu in sorted(gpus, key=lambda g: g.index)
    )


def resource_sets(gpus: Sequence[GpuInfo], unhealthy: Mapping[str, str]) -> tuple[ResourceSet, ...]:
    """Everything gpud advertises for this inventory; a node with no GPU advertises nothing.

    A resource with zero devices is not served at all, as NVIDIA's plugin does: an empty plugin
    would only make kubelet report a capacity of 0 for a resource the node never had.
    """
    devices = whole_gpu_devices(gpus, unhealthy)
    if not devices:
        return ()
    return (ResourceSet(GPU_RESOURCE, devices),)
