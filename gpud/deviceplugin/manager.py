"""The set of running plugins, kept equal to the resource sets the daemon wants advertised.

It also owns the kubelet relationship: when kubelet restarts (it deletes every socket in its
directory and re-creates ``kubelet.sock``) the affected servers are re-bound and every plugin
registers again at once. Registration failures are retried with a capped backoff, so a kubelet
that is down for minutes is picked up either by its socket appearing or by the next retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

import grpc

from gpud.deviceplugin.plugin import KUBELET_SOCKET, Plugin, PluginStatus
from gpud.deviceplugin.servicer import Snapshot

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


class PluginManager:
    def __init__(self, plugin_dir: Path) -> None:
        self.plugin_dir = plugin_dir
        self._plugins: dict[str, Plugin] = {}
        self._registering: dict[str, asyncio.Task[None]] = {}

    @property
    def kubelet_socket(self) -> Path:
        return self.plugin_dir / KUBELET_SOCKET

    def kubelet_present(self) -> bool:
        return self.kubelet_socket.is_socket()

    async def apply(self, snapshots: Mapping[str, Snapshot]) -> None:
        """Make the running plugins match ``snapshots``: stop, start or update in place.

        An unchanged resource keeps its server and its ListAndWatch stream; only its device list
        is pushed.
        """
        for resource in [r for r in self._plugins if r not in snapshots]:
            log.info("stopping plugin", extra={"RESOURCE": resource})
            self._cancel_registration(resource)
            await self._plugins.pop(resource).stop()
        for resource, snapshot in snapshots.items():
            plugin = self._plugins.get(resource)
            if plugin is not None:
                await plugin.servicer.publish(snapshot)
                continue
            plugin = Plugin(self.plugin_dir, snapshot)
            self._plugins[resource] = plugin
            if await self._serve(plugin):
                self._start_registration(plugin)

    async def resync(self, kubelet_restarted: bool) -> None:
        """Re-bind lost sockets; register what kubelet lacks (everything after its restart)."""
        for plugin in self._plugins.values():
            rebound = False
            if not plugin.socket_intact():
                rebound = await self._serve(plugin)
                if not rebound:
                    continue
            if kubelet_restarted or rebound or not plugin.registered:
                plugin.registered = False
                self._start_registration(plugin)

    async def socket_removed(self, name: str) -> None:
        """Someone (kubelet, on restart) removed a socket: re-bind it so it is ready to register."""
        for plugin in self._plugins.values():
            if plugin.socket_path.name == name and not plugin.socket_intact():
                log.info(
                    "plugin socket removed; serving again", extra={"RESOURCE": plugin.resource}
                )
                self._cancel_registration(plugin.resource)
                await self._serve(plugin)

    async def stop(self) -> None:
        for resource in list(self._registering):
            self._cancel_registration(resource)
        for plugin in self._plugins.values():
            await plugin.stop()
        self._plugins.clear()

    def snapshots(self) -> dict[str, Snapshot]:
        """What every running plugin serves now."""
        return {resource: p.servicer.snapshot for resource, p in self._plugins.items()}

    def statuses(self) -> list[PluginStatus]:
        return [p.status() for p in self._plugins.values()]

    async def _serve(self, plugin: Plugin) -> bool:
        if not self.plugin_dir.is_dir():
            plugin.error = f"waiting for kubelet: {self.plugin_dir} does not exist"
            return False
        try:
            await plugin.serve()
        except (OSError, RuntimeError) as exc:
            plugin.error = f"cannot serve {plugin.socket_path}: {exc}"
            log.error(plugin.error, extra={"RESOURCE": plugin.resource})
            return False
        return True

    def _start_registration(self, plugin: Plugin) -> None:
        self._cancel_registration(plugin.resource)
        task = asyncio.get_running_loop().create_task(self._register_until_done(plugin))
        self._registering[plugin.resource] = task
        task.add_done_callback(lambda t: self._forget(plugin.resource, t))

    def _forget(self, resource: str, task: asyncio.Task[None]) -> None:
        if self._registering.get(resource) is task:
            del self._registering[resource]

    def _cancel_registration(self, resource: str) -> None:
        task = self._registering.pop(resource, None)
        if task is not None:
            task.cancel()

    async def _register_until_done(self, plugin: Plugin) -> None:
        delay = RETRY_MIN_S
        while True:
            if not self.kubelet_present():
                # The directory watcher calls resync() when kubelet.sock appears.
                plugin.error = f"waiting for kubelet: {self.kubelet_socket} does not exist"
                return
            try:
                await plugin.register(REGISTER_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                plugin.error = f"registration failed: {exc.code().name}: {exc.details()}"
                log.warning(
                    "%s; retrying in %.0f s",
                    plugin.error,
                    delay,
                    extra={"RESOURCE": plugin.resource},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            log.info(
                "registered with kubelet",
                extra={"RESOURCE": plugin.resource, "ENDPOINT": plugin.socket_path.name},
            )
            return

    async def wait_registrations(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the registrations in flight, so that a caller who changed
        the resources can answer once kubelet knows them; a kubelet that is slow or away does
        not hold the caller longer (the registrations go on)."""
        tasks = list(self._registering.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
