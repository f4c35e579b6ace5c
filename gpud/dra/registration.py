"""What gpud tells kubelet's plugin watcher about itself (pluginregistration v1).

kubelet finds the registration socket in its ``plugins_registry`` directory, asks ``GetInfo`` who
is there and which DRA services it speaks, dials the endpoint, and then says with
``NotifyRegistrationStatus`` whether it took the plugin. That last call is the only sign a
plugin gets that kubelet can send it claims, so it is what gpud reports as "registered".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from gpud._proto.pluginregistration.v1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"
# kubelet takes the first entry it knows, in this order: v1 from 1.34, v1beta1 for 1.32-1.33.
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"


def plugin_info(driver: str, endpoint: str, health: bool) -> api_pb2.PluginInfo:
    """``GetInfo``'s answer; the health stream is advertised only where it is served, since a
    kubelet that sees it opens the stream and marks devices Unknown when it ends."""
    versions = [*DRA_SERVICES, *((HEALTH_SERVICE,) if health else ())]
    return api_pb2.PluginInfo(
        type=PLUGIN_TYPE, name=driver, endpoint=endpoint, supported_versions=versions
    )


class RegistrationServicer(api_pb2_grpc.RegistrationServicer):
    """``notified(registered, error)`` is called for each of kubelet's verdicts."""

    def __init__(self, info: api_pb2.PluginInfo, notified: Callable[[bool, str], None]) -> None:
        self._info = info
        self._notified = notified
        self.last_notified = 0.0

    async def GetInfo(
        self, request: api_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PluginInfo:
        return self._info

    async def NotifyRegistrationStatus(
        self, request: api_pb2.RegistrationStatus, context: grpc.aio.ServicerContext
    ) -> api_pb2.RegistrationStatusResponse:
        self.last_notified = time.time()
        if request.plugin_registered:
            log.info("kubelet registered DRA driver %s", self._info.name)
        else:
            log.error("kubelet refused DRA driver %s: %s", self._info.name, request.error)
        self._notified(request.plugin_registered, request.error)
        return api_pb2.RegistrationStatusResponse()
