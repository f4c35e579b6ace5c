"""The control API's ``ReadDevices``: what ``gpudctl top`` shows, read when it asks.

The values are read from the backend at the call, like a scrape of ``/metrics``, and the pods
from kubelet's PodResources ``List``; the rows come from the same pure derivation the metrics
use (:mod:`gpud.observe.rows`), so ``top`` and a dashboard never disagree about which pod holds
which device. A failure of one source does not fail the call: the GPUs are still read when
kubelet does not answer (``pods_error`` says why), and the devices are still listed when the
backend has no driver (``backend_error``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from gpud._proto.gpud.v1 import gpud_pb2
from gpud.hw.backend import Backend
from gpud.k8s.podresources import PodResourcesUnavailable
from gpud.node.hub import PublisherLink
from gpud.node.state import NodeState
from gpud.observe.pods import PodDevices, holders, list_pod_devices
from gpud.observe.rows import DeviceRow, device_rows, read_all

# kubelet answers List in milliseconds; a refresh of `top` must not hang on one that does not.
POD_RESOURCES_TIMEOUT_S = 2.0


def health(row: DeviceRow) -> str:
    if row.withdrawn:
        return "Withdrawn"
    return "Healthy" if row.healthy else "Unhealthy"


def reading_message(row: DeviceRow) -> gpud_pb2.DeviceReading:
    return gpud_pb2.DeviceReading(
        gpu=row.gpu.index,
        uuid=row.gpu.uuid,
        mig_uuid=row.mig_uuid,
        profile=row.profile,
        gi_id=row.gi_id,
        name=row.gpu.name,
        utilization_pct=row.utilization_pct,
        memory_used_mib=row.memory_used_mib,
        memory_total_mib=row.memory_total_mib,
        temperature_c=row.temperature_c,
        power_w=row.power_w,
        health=health(row),
        health_reason=row.reason,
        pods=[
            gpud_pb2.PodHolder(namespace=p.namespace, pod=p.pod, container=p.container)
            for p in row.pods
        ],
    )


def devices_message(
    state: NodeState, rows: Sequence[DeviceRow], pods_error: str
) -> gpud_pb2.DevicesReading:
    return gpud_pb2.DevicesReading(
        devices=[reading_message(row) for row in rows],
        pods_error=pods_error,
        backend_error=state.backend_error,
    )


class DeviceReadingsMixin:
    """Mixed into the control API's servicer, which provides ``link`` and ``backend``."""

    link: PublisherLink
    backend: Backend

    async def ReadDevices(
        self, request: gpud_pb2.ReadDevicesRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.DevicesReading:
        state = self.link.latest()
        readings, (pod_devices, pods_error) = await asyncio.gather(
            asyncio.to_thread(read_all, self.backend, state), _pods(state)
        )
        rows = device_rows(state, readings, holders(state, pod_devices))
        return devices_message(state, rows, pods_error)


async def _pods(state: NodeState) -> tuple[PodDevices, str]:
    try:
        return await list_pod_devices(state.pod_resources_socket, POD_RESOURCES_TIMEOUT_S), ""
    except PodResourcesUnavailable as exc:
        return {}, str(exc)
