"""What a container gets for the devices kubelet allocated to it, for kubelet's ``Allocate``.

The answer tells the container runtime which GPUs to inject, in the forms NVIDIA's tooling reads:
``NVIDIA_VISIBLE_DEVICES`` for the nvidia runtime hook, CDI device names (as an annotation or in the
CRI ``CDIDevices`` field) for CDI-aware runtimes, and optionally explicit ``/dev`` nodes so
kubelet's static CPU manager, which rewrites a container's device cgroup, keeps the GPUs reachable.

kubelet fails the pod's admission on any error here, so a bad request is refused with a message
that names the device, never half-served.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from gpud.config.models import DeviceIDStrategy, DeviceListStrategy, DevicePlugin
from gpud.resources.types import Device, ResourceSet

# Driver control nodes every CUDA process opens, beside its GPU's /dev/nvidia<minor>.
CONTROL_DEVICE_PATHS: tuple[str, ...] = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)

VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"

# Replica IDs are "<device id>::<n>" (NVIDIA's annotated-ID form).
REPLICA_SEPARATOR = "::"


class AllocationError(Exception):
    """A request gpud refuses; ``ids`` are the device IDs at fault (empty when none is)."""

    def __init__(self, message: str, ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.ids = tuple(ids)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device node to create in the container (``v1beta1.DeviceSpec``)."""

    container_path: str
    host_path: str
    permissions: str


@dataclass(frozen=True, slots=True)
class ContainerAllocation:
    """One ``ContainerAllocateResponse``, free of protobuf so it can be built and tested purely."""

    envs: dict[str, str]
    annotations: dict[str, str]
    cdi_devices: tuple[str, ...]
    device_specs: tuple[DeviceSpec, ...]


def container_allocation(
    rs: ResourceSet,
    ids: Sequence[str],
    cfg: DevicePlugin,
    control_devices: Sequence[str] = (),
) -> ContainerAllocation:
    """The response for one container asking for ``ids`` of ``rs``.

    ``control_devices`` are the entries of :data:`CONTROL_DEVICE_PATHS` that exist on this host;
    the caller checks, so this function stays free of I/O.

    Raises AllocationError for an empty request, repeated, unknown or unhealthy IDs, and for more
    than one replica where ``rs.fail_requests_greater_than_one`` is set.
    """
    chosen = _validate(rs, ids)

    # Two replicas of one GPU are still one GPU to the runtime: name each real device once.
    visible: dict[str, Device] = {}
    for d in chosen:
        visible.setdefault(d.visible_uuid, d)
    by_index = cfg.device_id_strategy is DeviceIDStrategy.INDEX
    names = [d.index if by_index else d.visible_uuid for d in visible.values()]

    strategies = set(cfg.device_list_strategy)
    envs: dict[str, str] = {}
    annotations: dict[str, str] = {}
    cdi_names = tuple(f"{cfg.cdi_kind}={name}" for name in names)
    if DeviceListStrategy.ENVVAR in strategies:
        envs[VISIBLE_DEVICES_ENV] = ",".join(names)
    if DeviceListStrategy.CDI_ANNOTATIONS in strategies:
        annotations[cdi_annotation_key(cfg, rs.resource)] = ",".join(cdi_names)

    specs: tuple[DeviceSpec, ...] = ()
    if cfg.pass_device_specs:
        paths = dict.fromkeys(control_devices)
        for d in chosen:
            paths.update(dict.fromkeys(d.device_paths))
        specs = tuple(DeviceSpec(p, p, "rw") for p in paths)

    return ContainerAllocation(
        envs=envs,
        annotations=annotations,
        cdi_devices=cdi_names if DeviceListStrategy.CDI_CRI in strategies else (),
        device_specs=specs,
    )


def cdi_annotation_key(cfg: DevicePlugin, resource: str) -> str:
    """``cdi.k8s.io/gpud_gpu`` for ``nvidia.com/gpu``.

    One fixed key per resource rather than NVIDIA's random suffix: a container gets one
    allocation per resource, and a stable key makes the response reproducible.
    """
    short = resource.split("/", 1)[-1]
    return f"{cfg.cdi_annotation_prefix}gpud_{short}"


def _validate(rs: ResourceSet, ids: Sequence[str]) -> list[Device]:
    resource = rs.resource
    if not ids:
        raise AllocationError(f"empty device request for {resource}")

    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise AllocationError(
            f"device IDs requested more than once for {resource}: {', '.join(repeated)}", repeated
        )

    if (
        rs.fail_requests_greater_than_one
        and len(ids) > 1
        and any(REPLICA_SEPARATOR in i for i in ids)
    ):
        raise AllocationError(
            f"maximum request size for shared resources is 1 (failRequestsGreaterThanOne); "
            f"{resource} request has {len(ids)}: {', '.join(ids)}",
            ids,
        )

    by_id = {d.id: d for d in rs.devices}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise AllocationError(f"unknown device IDs for {resource}: {', '.join(unknown)}", unknown)

    chosen = [by_id[i] for i in ids]
    sick = [d for d in chosen if not d.healthy]
    if sick:
        noun = "device" if len(sick) == 1 else "devices"
        raise AllocationError(
            f"unhealthy {noun} for {resource}: "
            + ", ".join(f"{d.id} (GPU {d.index})" for d in sick),
            [d.id for d in sick],
        )
    return chosen
