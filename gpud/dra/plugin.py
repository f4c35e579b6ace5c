"""The DRA kubelet plugin as a publisher: gpud's driver registered with kubelet (``allocation.mode:
dra``).

Two sockets, as kubelet expects of a DRA driver (shared/reference/dra.md §1): ``dra.sock`` in
``<kubelet root>/plugins/<driver>/`` serves the DRA node service (v1 and v1beta1), and
``<driver>-reg.sock`` in ``<kubelet root>/plugins_registry/`` serves registration. ``dra.sock`` is
served first because kubelet dials it as soon as it reads ``GetInfo``. kubelet finds the
registration socket by inotify and walks the directory again when it restarts, so a kubelet
restart needs nothing from gpud; a registration socket someone removed, or a directory re-created,
is served again at once (kubelet then registers the driver anew). Stale sockets are replaced
before listening, and removed at stop, registration first so that kubelet deregisters the driver
before its service goes.

Claims are read with the kubelet's own credentials (:mod:`gpud.kube.access`): a node identity may
get the claims of pods bound to its node, which are the only ones kubelet sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from gpud._proto.dra.v1 import api_pb2_grpc as v1_grpc
from gpud._proto.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from gpud._proto.drahealth.v1alpha1 import api_pb2_grpc as health_grpc
from gpud._proto.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from gpud.deviceplugin.watcher import KubeletDirWatcher
from gpud.dra import switch
from gpud.dra.checkpoint import FILE_NAME, Checkpoint
from gpud.dra.health import HealthServicer, device_health
from gpud.dra.registration import RegistrationServicer, plugin_info
from gpud.dra.service import DraPluginV1, DraPluginV1beta1, DraService
from gpud.kube import access as kube_access
from gpud.kube.client import KubeClient
from gpud.node.hub import PublisherLink, Update
from gpud.resources.allocate import CONTROL_DEVICE_PATHS

log = logging.getLogger(__name__)


class _Endpoint:
    """One gRPC server on one unix socket, re-created when its file is lost."""

    def __init__(self, path: Path, add: Callable[[grpc.aio.Server], None]) -> None:
        self.path = path
        self._add = add
        self._server: grpc.aio.Server | None = None
        self._inode: tuple[int, int] | None = None

    def intact(self) -> bool:
        if self._server is None or self._inode is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    async def serve(self) -> None:
        """Listen on a fresh socket file (a stale one is removed; the old server stops first,
        as gRPC unlinks its path on shutdown)."""
        await self._stop_server()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server = grpc.aio.server()
        self._add(server)
        server.add_insecure_port(f"unix:{self.path}")
        await server.start()
        st = os.stat(self.path)
        self._server, self._inode = server, (st.st_dev, st.st_ino)

    async def stop(self) -> None:
        intact = self.intact()
        await self._stop_server()
        if intact:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _stop_server(self) -> None:
        if self._server is not None:
            server, self._server, self._inode = self._server, None, None
            await server.stop(grace=None)


class DraPublisher:
    name = "dra"

    def __init__(self, kubelet_root: Path) -> None:
        self.kubelet_root = kubelet_root
        self.registered = False
        self.error = ""
        self._link: PublisherLink | None = None
        self._driver = ""
        self._dra: _Endpoint | None = None
        self._reg: _Endpoint | None = None
        self._watching: list[asyncio.Task[None]] = []
        self._sync_lock = asyncio.Lock()
        self._client: KubeClient | None = None
        self._access: kube_access.Access | None = None
        self._health = HealthServicer()

    @property
    def registry_dir(self) -> Path:
        return self.kubelet_root / "plugins_registry"

    async def start(self, link: PublisherLink) -> None:
        self._link = link
        state = link.latest()
        self._driver = driver = state.config.dra.driver_name
        # The other API's leftovers go before this one advertises anything.
        old = switch.withdraw(switch.device_plugin_sockets(state.kubelet_dir))
        for path in old.removed:
            log.info("removed stale device-plugin socket %s (allocation.mode is dra)", path)
        if old.live:
            live = ", ".join(map(str, old.live))
            raise RuntimeError(
                f"a device plugin still serves {live}: a node must not offer its GPUs through "
                "both the device-plugin API and DRA; stop it (or set allocation.mode: "
                "device-plugin)"
            )
        checkpoint = Checkpoint(state.config.paths.state_dir / FILE_NAME)
        problem = checkpoint.load()
        if problem:
            link.degraded(problem)
        service = DraService(
            driver,
            state.config.dra.cdi_dir,
            checkpoint,
            link.latest,
            self._pool,
            self._read_claim,
            lambda: tuple(p for p in CONTROL_DEVICE_PATHS if os.path.exists(p)),
        )
        dra_sock = switch.service_socket(self.kubelet_root, driver)

        def add_dra(server: grpc.aio.Server) -> None:
            v1_grpc.add_DRAPluginServicer_to_server(DraPluginV1(service), server)
            v1beta1_grpc.add_DRAPluginServicer_to_server(DraPluginV1beta1(service), server)
            health_grpc.add_DRAResourceHealthServicer_to_server(self._health, server)

        await self._health.publish(self._pool(), device_health(state))
        info = plugin_info(driver, str(dra_sock), health=True)
        registration = RegistrationServicer(info, self._notified)
        self._dra = _Endpoint(dra_sock, add_dra)
        self._reg = _Endpoint(
            switch.registration_socket(self.kubelet_root, driver),
            lambda s: reg_grpc.add_RegistrationServicer_to_server(registration, s),
        )
        watchers = [
            KubeletDirWatcher(self.registry_dir, self._sync, self._removed, trigger=None),
            KubeletDirWatcher(dra_sock.parent, self._sync, self._removed, trigger=None),
        ]
        self._watching = [asyncio.create_task(w.run()) for w in watchers]
        for watcher, task in zip(watchers, self._watching, strict=True):
            armed = asyncio.create_task(watcher.armed.wait())
            await asyncio.wait({armed, task}, return_when=asyncio.FIRST_COMPLETED)
            if not armed.done():
                armed.cancel()
                task.result()
                raise RuntimeError(f"the watch on {watcher.plugin_dir} ended before it was armed")
        await self._sync()

    async def publish(self, update: Update) -> None:
        """Device health to kubelet's streams (Prepare reads the latest snapshot itself)."""
        await self._health.publish(self._pool(), device_health(update.state))

    async def stop(self) -> None:
        await self._health.close()
        for task in self._watching:
            task.cancel()
        await asyncio.gather(*self._watching, return_exceptions=True)
        if self._reg is not None:
            await self._reg.stop()
        if self._dra is not None:
            await self._dra.stop()
        if self._client is not None:
            await self._client.close()

    async def _sync(self) -> None:
        """Serve whatever socket is missing, once kubelet's registry directory exists."""
        assert self._dra is not None and self._reg is not None
        async with self._sync_lock:
            if not self.registry_dir.is_dir():
                self._say(f"waiting for kubelet: {self.registry_dir} does not exist")
                return
            self._dra.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            if not self._dra.intact():
                await self._dra.serve()
                # kubelet registers the driver anew and dials the new socket.
                await self._reg.stop()
            if not self._reg.intact():
                self.registered = False
                await self._reg.serve()
                self._say(f"serving {self._reg.path}; waiting for kubelet to register it")

    async def _removed(self, name: str) -> None:
        await self._sync()

    def _notified(self, registered: bool, error: str) -> None:
        self.registered, self.error = registered, error
        assert self._link is not None
        if registered:
            self._link.recovered()
            self._say(f"DRA driver {self._driver} registered with kubelet ({self._reg_path()})")
        else:
            self._link.degraded(f"kubelet refused DRA driver {self._driver}: {error}")

    def _reg_path(self) -> str:
        return str(self._reg.path) if self._reg is not None else ""

    def _say(self, detail: str) -> None:
        if self._link is not None:
            self._link.set_detail(detail)

    def _kube(self) -> tuple[kube_access.Access, KubeClient | None]:
        """The kubelet's credentials, resolved again while they are missing (a node that
        joins the cluster after gpud started)."""
        assert self._link is not None
        if self._access is None or not self._access.on:
            self._access = kube_access.resolve(self._link.latest().config.kubernetes)
            if self._access.on:
                self._client = KubeClient(self._access)
        return self._access, self._client

    def _pool(self) -> str:
        """NVIDIA's pool name: the node's name."""
        return self._kube()[0].node_name

    async def _read_claim(self, namespace: str, name: str) -> Mapping[str, Any]:
        access, client = self._kube()
        if client is None:
            raise RuntimeError(f"no credentials to read claims: {access.off_reason}")
        return await client.resource_claim(namespace, name)
