"""The daemon: one event loop, one reconcile loop, every effect on the node routed through it.

Triggers (start-up, a hardware event, ``set-healthy``, a config reload, kubelet restarting) only
change the desired state and ask for a pass; :meth:`Daemon._reconcile_once` then derives the
resource sets from that state and makes the plugins match. Hardware events arrive on NVML's
thread and are handed to the loop with ``call_soon_threadsafe``, so state is only ever touched
from the loop's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

from gpud import __version__
from gpud.config.load import ConfigError
from gpud.daemon.gateway import Gateway
from gpud.daemon.notify import Notifier
from gpud.daemon.settings import Settings
from gpud.deviceplugin.manager import PluginManager
from gpud.deviceplugin.plugin import PluginStatus
from gpud.deviceplugin.servicer import Snapshot
from gpud.deviceplugin.watcher import KubeletDirWatcher
from gpud.health import XidPolicy, initial_reasons, unhealthy_reason
from gpud.hw.backend import Backend
from gpud.hw.errors import BackendUnavailable, HwError
from gpud.hw.types import EventKind, GpuInfo, HwEvent, SystemInfo
from gpud.resources.allocate import CONTROL_DEVICE_PATHS
from gpud.resources.gpus import resource_sets
from gpud.resources.topology import Topology

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.started = time.monotonic()
        self.system = SystemInfo(backend=backend.name)
        self.backend_error = ""
        self.gpus: tuple[GpuInfo, ...] = ()
        self.reasons: dict[str, str] = {}
        self.policy = XidPolicy.from_config(settings.config.health)
        self.manager = PluginManager(settings.kubelet_dir)
        self.notifier = Notifier()
        self._topology = Topology.from_gpus(())
        self._control_devices: tuple[str, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty = asyncio.Event()
        self._next_pass: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._next_pass = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_logged()))

        from gpud.daemon.api import serve_api

        gateway = Gateway(
            self.settings.config.paths.socket, self.settings.config.paths.socket_group
        )
        api_server = await serve_api(self, gateway)
        self._open_backend()

        watcher = KubeletDirWatcher(
            self.settings.kubelet_dir, self._kubelet_started, self.manager.socket_removed
        )
        tasks = [loop.create_task(watcher.run()), loop.create_task(self._reconcile_loop())]
        await watcher.armed.wait()
        await self.reconcile()
        self.notifier.ready(self._status_line())
        self.notifier.start_watchdog(loop)
        log.info("gpud %s ready: %s", __version__, self._status_line())

        await self._stop.wait()
        log.info("stopping: withdrawing plugins and removing sockets")
        self.notifier.stopping()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.manager.stop()
        await api_server.stop(grace=0.5)
        await gateway.stop()
        self.backend.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _open_backend(self) -> None:
        try:
            self.backend.open()
            self.system = self.backend.system()
            gpus = tuple(self.backend.gpus())
            self.backend.start_events(self._event_from_any_thread)
        except BackendUnavailable as exc:
            self.backend_error = f"no driver: {exc}"
            log.error("%s; advertising no GPUs until it is fixed", self.backend_error)
            gpus = ()
        except HwError as exc:
            self.backend_error = str(exc)
            log.error("cannot read the GPUs: %s", exc)
            gpus = ()
        else:
            self.backend_error = ""
        self._set_inventory(gpus)

    def _set_inventory(self, gpus: tuple[GpuInfo, ...]) -> None:
        self.gpus = gpus
        self.reasons = initial_reasons(gpus, self.reasons)
        self._topology = Topology.from_gpus(gpus)
        self._control_devices = tuple(p for p in CONTROL_DEVICE_PATHS if os.path.exists(p))
        for gpu in gpus:
            if gpu.uuid in self.reasons:
                log.warning(
                    "GPU %d unhealthy: %s",
                    gpu.index,
                    self.reasons[gpu.uuid],
                    extra={"GPU_UUID": gpu.uuid},
                )

    # ---- the reconcile loop ------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Ask for a pass and wait until one that started after this call has finished."""
        assert self._next_pass is not None
        waiter = self._next_pass
        self._dirty.set()
        await asyncio.shield(waiter)

    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            done, self._next_pass = self._next_pass, loop.create_future()
            try:
                await self._reconcile_once()
            except Exception:
                log.exception("reconcile pass failed; the next trigger retries it")
            finally:
                if done is not None and not done.done():
                    done.set_result(None)

    async def _reconcile_once(self) -> None:
        cfg = self.settings.config.device_plugin
        snapshots = {
            rs.resource: Snapshot(rs, self._topology, cfg, self._control_devices)
            for rs in resource_sets(self.gpus, self.reasons)
        }
        await self.manager.apply(snapshots)
        self.notifier.status(self._status_line())

    async def _kubelet_started(self) -> None:
        await self.manager.resync(kubelet_restarted=True)

    def _status_line(self) -> str:
        if self.backend_error:
            return self.backend_error
        healthy = sum(1 for g in self.gpus if g.uuid not in self.reasons)
        return f"{healthy}/{len(self.gpus)} GPUs healthy, {len(self.manager.statuses())} plugins"

    # ---- triggers ----------------------------------------------------------------------------

    def _event_from_any_thread(self, event: HwEvent) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.handle_event, event)

    def handle_event(self, event: HwEvent) -> str | None:
        """Record what a hardware event means for its GPU; returns the unhealthy reason if any."""
        reason = unhealthy_reason(event, self.policy)
        extra = {"GPU_UUID": event.uuid, "XID": event.xid}
        if reason is None:
            log.info("ignored XID %d (application error)", event.xid, extra=extra)
            return None
        if event.uuid not in {g.uuid for g in self.gpus}:
            log.warning("event for unknown GPU: %s", reason, extra=extra)
            return None
        log.error("GPU unhealthy: %s", reason, extra=extra)
        self.reasons[event.uuid] = reason
        if event.kind is EventKind.GPU_LOST:
            self.gpus = tuple(
                dataclasses.replace(g, lost=True) if g.uuid == event.uuid else g for g in self.gpus
            )
        self._dirty.set()
        return reason

    async def set_healthy(self, uuid: str) -> GpuInfo:
        gpu = self.gpu_by_uuid(uuid)
        if gpu.lost:
            raise LookupError(
                f"GPU {gpu.index} ({uuid}) is lost to NVML; reset it or reboot, then try again"
            )
        if self.reasons.pop(uuid, None) is not None:
            log.info("GPU returned to service by the operator", extra={"GPU_UUID": uuid})
        await self.reconcile()
        return gpu

    def gpu_by_uuid(self, uuid: str) -> GpuInfo:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise KeyError(uuid)

    async def reload(self) -> Path | None:
        """Re-read the config; raises ConfigError and keeps the running config when it is bad."""
        self.notifier.reloading()
        try:
            fresh = self.settings.reload()
        except ConfigError:
            self.notifier.reloaded(self._status_line())
            raise
        old = self.settings
        for what, before, after in (
            ("backend", old.config.backend, fresh.config.backend),
            ("simulate", old.config.simulate, fresh.config.simulate),
            ("paths.stateDir", old.config.paths.state_dir, fresh.config.paths.state_dir),
            ("paths.socket", old.config.paths.socket, fresh.config.paths.socket),
            ("kubelet directory", old.kubelet_dir, fresh.kubelet_dir),
        ):
            if before != after:
                log.warning(
                    "%s changed (%s -> %s): takes effect after a restart", what, before, after
                )
        self.settings = Settings(
            config=fresh.config.model_copy(
                update={
                    "backend": old.config.backend,
                    "simulate": old.config.simulate,
                    "paths": old.config.paths,
                }
            ),
            config_file=fresh.config_file,
            kubelet_dir=old.kubelet_dir,
            kubelet_reason=old.kubelet_reason,
            reload=fresh.reload,
        )
        self.policy = XidPolicy.from_config(self.settings.config.health)
        if self.backend_error:
            self.backend.close()
            self._open_backend()
        await self.reconcile()
        self.notifier.reloaded(self._status_line())
        log.info("configuration reloaded from %s", fresh.config_file or "defaults")
        return fresh.config_file

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)

    # ---- views for the control API -----------------------------------------------------------

    def plugin_statuses(self) -> list[PluginStatus]:
        return self.manager.statuses()

    def uptime(self) -> float:
        return time.monotonic() - self.started
