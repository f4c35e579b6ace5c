"""One resource's plugin: its socket, its gRPC server and its registration with kubelet.

The server is always serving before ``Register`` is sent, because kubelet dials the endpoint back
synchronously inside its ``Register`` handler and fails the registration if nobody answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import grpc

from gpud._proto.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from gpud.deviceplugin.servicer import OPTIONS, PluginServicer, Snapshot
from gpud.node.stats import ResourceCounters

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
# kubelet may bind kubelet.sock a moment before it listens; retry the dial quickly instead of
# waiting out gRPC's default one-second reconnect backoff. A local subchannel pool makes every
# registration dial afresh: a pooled connection may still lead to the kubelet that just exited.
_DIAL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 2),
    ("grpc.min_reconnect_backoff_ms", 2),
    ("grpc.max_reconnect_backoff_ms", 250),
]


class Plugin:
    def __init__(self, plugin_dir: Path, snapshot: Snapshot, counters: ResourceCounters) -> None:
        self.resource = snapshot.resources.resource
        self.plugin_dir = plugin_dir
        self.socket_path = plugin_dir / snapshot.resources.socket_name
        self.servicer = PluginServicer(snapshot, counters)
        self.registered = False
        self.error = ""
        self._server: grpc.aio.Server | None = None
        self._inode: tuple[int, int] | None = None

    def socket_intact(self) -> bool:
        """Whether the socket file kubelet would dial is still the one this server listens on."""
        if self._server is None or self._inode is None:
            return False
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    async def serve(self) -> None:
        """(Re)start the server on a fresh socket file; any previous server is stopped first.

        The old server goes first because gRPC unlinks its unix socket path when it shuts down,
        which would remove the new server's socket if the order were reversed.
        """
        await self._stop_server()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        await server.start()
        st = os.stat(self.socket_path)
        self._server, self._inode = server, (st.st_dev, st.st_ino)
        self.registered = False

    async def register(self, timeout: float) -> None:
        """Announce the endpoint to kubelet; raises grpc.aio.AioRpcError when kubelet refuses."""
        kubelet = self.plugin_dir / KUBELET_SOCKET
        request = api_pb2.RegisterRequest(
            version=API_VERSION,
            endpoint=self.socket_path.name,
            resource_name=self.resource,
            options=OPTIONS,
        )
        async with grpc.aio.insecure_channel(f"unix:{kubelet}", options=_DIAL_OPTIONS) as channel:
            await api_pb2_grpc.RegistrationStub(channel).Register(
                request, timeout=timeout, wait_for_ready=True
            )
        self.registered, self.error = True, ""

    async def stop(self) -> None:
        """Stop serving and remove the socket, but only if it is still ours."""
        await self.servicer.close()
        intact = self.socket_intact()
        await self._stop_server()
        if intact:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self.registered = False

    async def _stop_server(self) -> None:
        if self._server is not None:
            server, self._server, self._inode = self._server, None, None
            await server.stop(grace=None)
