"""The set of running plugins, kept equal to the resource sets the daemon wants advertised.

It also owns the kubelet relationship: when kubelet restarts (it deletes every socket in its
directory and re-creates ``kubelet.sock``) the affected servers are re-bound and every plugin
registers again at once. Registration failures are retried with a capped backoff, so a kubelet
that is down for minutes is picked up either by its socket appearing or by the next retry.

Whenever the plugins' state changes (served, registering, registered, failing) the manager calls
``report`` with every plugin's status and the registrations kubelet just accepted, and it counts
registrations in :class:`gpud.node.stats.NodeStats`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from gpud.deviceplugin.plugin import KUBELET_SOCKET, Plugin
from gpud.deviceplugin.servicer import Snapshot
from gpud.node.events import PluginRegistered
from gpud.node.state import PluginStatus
from gpud.node.stats import NodeStats

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


Report = Callable[[tuple[PluginStatus, ...], tuple[PluginRegistered, ...]], None]


class PluginManager:
    def __init__(self, plugin_dir: Path, stats: NodeStats, report: Report) -> None:
        self.plugin_dir = plugin_dir
        self._stats = stats
        self._report = report
        self._plugins: dict[str, Plugin] = {}
        self._registering: dict[str, asyncio.Task[None]] = {}
        self._reported: tuple[PluginStatus, ...] = ()
        # Resources kubelet accepted at least once since gpud started.
        self._registered_once: set[str] = set()

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
            plugin = Plugin(self.plugin_dir, snapshot, self._stats.resource(resource))
            self._plugins[resource] = plugin
            if await self._serve(plugin):
                self._start_registration(plugin)
        self._changed()

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
        self._changed()

    async def socket_removed(self, name: str) -> None:
        """Someone (kubelet, on restart) removed a socket: re-bind it so it is ready to register."""
        for plugin in self._plugins.values():
            if plugin.socket_path.name == name and not plugin.socket_intact():
                log.info(
                    "plugin socket removed; serving again", extra={"RESOURCE": plugin.resource}
                )
                self._cancel_registration(plugin.resource)
                await self._serve(plugin)
        self._changed()

    async def stop(self) -> None:
        for resource in list(self._registering):
            self._cancel_registration(resource)
        for plugin in self._plugins.values():
            await plugin.stop()
        self._plugins.clear()

    def statuses(self) -> tuple[PluginStatus, ...]:
        return tuple(
            PluginStatus(
                resource=p.resource,
                socket=str(p.socket_path),
                registered=p.registered,
                registering=p.resource in self._registering,
                error=p.error,
            )
            for p in self._plugins.values()
        )

    def _changed(self, *registered: PluginRegistered) -> None:
        """Report the plugins' state if it changed (or kubelet accepted one)."""
        statuses = self.statuses()
        if statuses != self._reported or registered:
            self._reported = statuses
            self._report(statuses, registered)

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
            self._changed()

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
                self._changed()
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
            again = plugin.resource in self._registered_once
            self._registered_once.add(plugin.resource)
            counters = self._stats.resource(plugin.resource)
            counters.registrations += 1
            if again:
                counters.reregistrations += 1
            # No longer in flight from here: one report says both.
            if self._registering.get(plugin.resource) is asyncio.current_task():
                del self._registering[plugin.resource]
            event = PluginRegistered(time.time(), plugin.resource, plugin.socket_path.name, again)
            self._changed(event)
            return
