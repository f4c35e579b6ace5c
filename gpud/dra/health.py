"""Device health to pods: kubelet's v1alpha1 ``NodeWatchResources`` stream (KEP-4680).

kubelet opens the stream once per registered driver and shows, for every device allocated to a
pod, the health the driver last sent in the pod's ``allocatedResourcesStatus``. Each message is the
driver's complete device list on this node. gpud sends one when a device's health changes (an XID,
a GPU lost, a GPU back in service) straight from the node snapshot, never by polling, and repeats
the list every :data:`RESEND_S` so that kubelet, which takes news older than the timeout sent with
it for Unknown, can tell a gpud that stopped from one with nothing new to say.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from gpud._proto.drahealth.v1alpha1 import api_pb2, api_pb2_grpc
from gpud.dra.devices import dra_devices
from gpud.node.state import NodeState

RESEND_S = 60.0
# kubelet's DefaultHealthTimeout is 30 s; gpud resends every minute, so allow three.
TIMEOUT_S = 180
MESSAGE_MAX = 1024

# (device name, healthy, why not)
Health = tuple[tuple[str, bool, str], ...]


def device_health(state: NodeState) -> Health:
    """Every device this driver publishes now (:func:`gpud.dra.devices.dra_devices`: the same
    names as the ResourceSlices) with the effective health gpud holds for it."""
    out = []
    for published in dra_devices(state, ""):
        device = state.device(published.uuid)
        gpu = state.gpu(published.uuid)
        lost = gpu is not None and gpu.lost
        healthy = device is not None and device.healthy and not lost
        reason = device.reason if device is not None else ""
        out.append((published.name, healthy, reason or ("GPU lost" if lost else "")))
    return tuple(out)


def health_message(pool: str, health: Health, now: float) -> api_pb2.NodeWatchResourcesResponse:
    return api_pb2.NodeWatchResourcesResponse(
        devices=[
            api_pb2.DeviceHealth(
                device=api_pb2.DeviceIdentifier(pool_name=pool, device_name=name),
                health=api_pb2.HEALTHY if ok else api_pb2.UNHEALTHY,
                last_updated_time=int(now),
                health_check_timeout_seconds=TIMEOUT_S,
                message=why[:MESSAGE_MAX],
            )
            for name, ok, why in health
        ]
    )


class HealthServicer(api_pb2_grpc.DRAResourceHealthServicer):
    def __init__(self) -> None:
        self._pool = ""
        self._health: Health = ()
        self._generation = 0
        self._closed = False
        self._changed = asyncio.Condition()

    async def publish(self, pool: str, health: Health) -> None:
        async with self._changed:
            if (pool, health) != (self._pool, self._health):
                self._pool, self._health = pool, health
                self._generation += 1
                self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def NodeWatchResources(
        self, request: api_pb2.NodeWatchResourcesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.NodeWatchResourcesResponse]:
        seen = -1
        while True:
            async with self._changed:
                if self._generation == seen and not self._closed:
                    # Nothing new within RESEND_S: the same list again, newly dated.
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), RESEND_S)
                if self._closed:
                    return
                seen = self._generation
                pool, health = self._pool, self._health
            yield health_message(pool, health, time.time())
