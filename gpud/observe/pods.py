"""Which pods hold which of gpud's devices, from kubelet's PodResources ``List``.

dcgm-exporter keeps one pod per device (the last one listed wins) and drops renamed resources such
as ``nvidia.com/gpu.shared`` (shared/reference/cluster-integration.md §1.5). gpud knows what it
advertised under which name and ID, so it keeps every holder of a time-sliced GPU and attributes
renamed resources too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpud._proto.podresources.v1 import api_pb2
from gpud.k8s.podresources import base_uuid, list_pod_resources
from gpud.node.state import NodeState


@dataclass(frozen=True, slots=True, order=True)
class PodRef:
    """One container of one pod; sorts by namespace, pod, container."""

    namespace: str
    pod: str
    container: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.container}"


PodDevices = Mapping[tuple[str, str], tuple[PodRef, ...]]
"""(resource name, device ID as kubelet gave it) -> the containers holding it, sorted, distinct."""


def pod_devices(
    response: api_pb2.ListPodResourcesResponse,
) -> dict[tuple[str, str], tuple[PodRef, ...]]:
    """Every device-plugin device of the answer by resource and ID (see :data:`PodDevices`)."""
    found: dict[tuple[str, str], set[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = PodRef(pod.namespace, pod.name, container.name)
            for devices in container.devices:
                for device_id in devices.device_ids:
                    found.setdefault((devices.resource_name, device_id), set()).add(ref)
    return {key: tuple(sorted(refs)) for key, refs in found.items()}


async def list_pod_devices(socket: Path, timeout: float) -> PodDevices:
    """Ask kubelet at ``socket``; raises
    :class:`gpud.k8s.podresources.PodResourcesUnavailable` when it cannot be asked."""
    return pod_devices(await list_pod_resources(socket, timeout))


def holders(state: NodeState, pod_devices: PodDevices) -> Mapping[str, tuple[PodRef, ...]]:
    """Device UUID (a GPU's, or a MIG device's) -> the sorted, distinct containers holding it.

    Only resources gpud advertises count (another plugin's ``nvidia.com/gpu`` on the same node is
    not gpud's to report). A replica ``<uuid>::<n>`` counts for the device behind it, so every pod
    sharing a time-sliced GPU is listed. An ID gpud no longer advertises (kubelet still lists a
    pod that got it before a MIG layout change) counts for its UUID while that device exists.
    """
    advertised = {(rs.resource, d.id): d.visible_uuid for rs in state.resources for d in rs.devices}
    names = {rs.resource for rs in state.resources}
    known = {d.uuid for d in state.devices}
    found: dict[str, set[PodRef]] = {}
    for (resource, device_id), refs in pod_devices.items():
        if resource not in names:
            continue
        uuid = advertised.get((resource, device_id))
        if uuid is None:
            uuid = base_uuid(device_id)
            if uuid not in known:
                continue
        found.setdefault(uuid, set()).update(refs)
    return {uuid: tuple(sorted(refs)) for uuid, refs in sorted(found.items())}
