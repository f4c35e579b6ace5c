"""The v1beta1 ``DevicePlugin`` service for one resource.

State arrives as a :class:`Snapshot` (built once per layout or health change) and is swapped in
whole, so a call in flight always sees one consistent view. ``ListAndWatch`` streams are woken by
:meth:`PluginServicer.publish`, never by a timer: an idle node costs no CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from gpud._proto.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from gpud.config.models import DevicePlugin
from gpud.node.stats import ResourceCounters
from gpud.resources.allocate import AllocationError, container_allocation
from gpud.resources.preferred import preferred_allocation
from gpud.resources.topology import Topology
from gpud.resources.types import Device, ResourceSet

OPTIONS = api_pb2.DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=True
)


@dataclass(frozen=True)
class Snapshot:
    """What one plugin serves; ``control_devices`` are the /dev/nvidia* nodes that exist."""

    resources: ResourceSet
    topology: Topology
    config: DevicePlugin
    control_devices: tuple[str, ...] = ()

    def devices(self) -> dict[str, Device]:
        return {d.id: d for d in self.resources.devices}


def list_response(rs: ResourceSet) -> api_pb2.ListAndWatchResponse:
    return api_pb2.ListAndWatchResponse(
        devices=[
            api_pb2.Device(
                ID=d.id,
                health=d.health,
                topology=(
                    api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=d.numa_node)])
                    if d.numa_node is not None
                    else None
                ),
            )
            for d in rs.devices
        ]
    )


class PluginServicer(api_pb2_grpc.DevicePluginServicer):
    """``counters`` are the resource's in :class:`gpud.node.stats.NodeStats`, bumped in place."""

    def __init__(self, snapshot: Snapshot, counters: ResourceCounters) -> None:
        self._counters = counters
        self._snapshot = snapshot
        self._by_id = snapshot.devices()
        self._message = list_response(snapshot.resources)
        self._generation = 0
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def publish(self, snapshot: Snapshot) -> None:
        """Swap in a new view; open streams send the new device list only if it changed."""
        message = list_response(snapshot.resources)
        async with self._changed:
            self._snapshot = snapshot
            self._by_id = snapshot.devices()
            if message != self._message:
                self._message = message
                self._generation += 1
                self._changed.notify_all()

    async def close(self) -> None:
        """End every open stream so a stopped server does not hold kubelet's calls open."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return OPTIONS

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        seen = -1
        while True:
            async with self._changed:
                while not self._closed and self._generation == seen:
                    await self._changed.wait()
                if self._closed:
                    return
                seen = self._generation
                message = self._message
            yield message

    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        snapshot, by_id = self._snapshot, self._by_id
        responses = []
        for req in request.container_requests:
            try:
                chosen = preferred_allocation(
                    by_id,
                    snapshot.topology,
                    list(req.available_deviceIDs),
                    list(req.must_include_deviceIDs),
                    req.allocation_size,
                )
            except ValueError as exc:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{snapshot.resources.resource}: {exc}"
                )
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AllocateResponse:
        snapshot = self._snapshot
        self._counters.allocate_calls += 1
        responses = []
        for req in request.container_requests:
            try:
                responses.append(allocate_response(snapshot, req.devices_ids))
            except AllocationError as exc:
                self._counters.allocate_errors += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return api_pb2.AllocateResponse(container_responses=responses)

    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


def allocate_response(snapshot: Snapshot, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse:
    alloc = container_allocation(
        snapshot.resources, list(ids), snapshot.config, snapshot.control_devices
    )
    return api_pb2.ContainerAllocateResponse(
        envs=alloc.envs,
        annotations=alloc.annotations,
        cdi_devices=[api_pb2.CDIDevice(name=name) for name in alloc.cdi_devices],
        devices=[
            api_pb2.DeviceSpec(
                container_path=s.container_path, host_path=s.host_path, permissions=s.permissions
            )
            for s in alloc.device_specs
        ],
    )
