"""kubelet's link to the node state: the device-plugin servers as a publisher.

Each snapshot's resource sets become what the plugin servers serve (:func:`plugin_snapshots`,
pure), pushed to kubelet's ListAndWatch streams as they change. The link owns everything about
kubelet: the plugin manager, the watch on kubelet's directory (a kubelet restart re-registers
every plugin without the daemon knowing), and reporting the plugins' state back through the
request door. The daemon waits for it to take each snapshot (it is the hub's one ``awaited``
publisher): a MIG apply destroys instances only once kubelet was told they are withdrawn.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from gpud.config.models import DevicePlugin
from gpud.deviceplugin.manager import PluginManager
from gpud.deviceplugin.servicer import Snapshot
from gpud.deviceplugin.watcher import KubeletDirWatcher
from gpud.dra import switch
from gpud.hw.types import GpuInfo
from gpud.node.events import PluginRegistered
from gpud.node.hub import PublisherLink, Update
from gpud.node.state import NodeState, PluginStatus
from gpud.resources.allocate import CONTROL_DEVICE_PATHS
from gpud.resources.topology import Topology
from gpud.resources.types import ResourceSet

log = logging.getLogger(__name__)


def plugin_snapshots(
    state: NodeState, topology: Topology, control_devices: tuple[str, ...]
) -> dict[str, Snapshot]:
    """What each plugin server serves for ``state``: one per advertised resource."""
    config = state.config.device_plugin
    return {rs.resource: Snapshot(rs, topology, config, control_devices) for rs in state.resources}


class KubeletPublisher:
    name = "kubelet"

    def __init__(self, plugin_dir: Path, other_api: Sequence[Path] = ()) -> None:
        """``other_api``: the DRA plugin's sockets, removed at start if nobody answers on
        them (a gpud killed in DRA mode and started in device-plugin mode)."""
        self.plugin_dir = plugin_dir
        self._other_api = other_api
        self._link: PublisherLink | None = None
        self._manager: PluginManager | None = None
        self._watching: asyncio.Task[None] | None = None
        # The inputs of the last apply: an unchanged snapshot part (a plugin status report
        # makes a new snapshot too) costs nothing.
        self._served: tuple[tuple[ResourceSet, ...], DevicePlugin] | None = None
        # Derived once per inventory, not per snapshot: GetPreferredAllocation's scores, and
        # the /dev/nvidia* control nodes Allocate hands out.
        self._gpus: Sequence[GpuInfo] | None = None
        self._topology = Topology.from_gpus(())
        self._control_devices: tuple[str, ...] = ()

    async def start(self, link: PublisherLink) -> None:
        """Arm the watch on kubelet's directory before anything is served, so that a kubelet
        (re)starting from now on is noticed."""
        self._link = link
        link.set_detail(str(self.plugin_dir))
        old = switch.withdraw(self._other_api)
        for path in old.removed:
            log.info("removed stale DRA socket %s (allocation.mode is device-plugin)", path)
        for path in old.live:
            log.warning("a DRA driver still serves %s beside gpud's device plugins", path)
        manager = self._manager = PluginManager(self.plugin_dir, link.stats, self._report)
        watcher = KubeletDirWatcher(self.plugin_dir, self._kubelet_started, manager.socket_removed)
        self._watching = asyncio.create_task(watcher.run())
        armed = asyncio.create_task(watcher.armed.wait())
        await asyncio.wait({armed, self._watching}, return_when=asyncio.FIRST_COMPLETED)
        if not armed.done():
            armed.cancel()
            self._watching.result()  # raises why the watch ended
            raise RuntimeError(f"the watch on {self.plugin_dir} ended before it was armed")

    async def publish(self, update: Update) -> None:
        assert self._manager is not None
        state = update.state
        if state.gpus is not self._gpus:
            self._gpus = state.gpus
            self._topology = Topology.from_gpus(state.gpus)
            self._control_devices = tuple(p for p in CONTROL_DEVICE_PATHS if os.path.exists(p))
            self._served = None
        served = (state.resources, state.config.device_plugin)
        if served == self._served:
            return
        await self._manager.apply(plugin_snapshots(state, self._topology, self._control_devices))
        self._served = served

    async def stop(self) -> None:
        """Withdraw every plugin and remove its socket."""
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        if self._manager is not None:
            await self._manager.stop()

    async def _kubelet_started(self) -> None:
        assert self._manager is not None
        await self._manager.resync(kubelet_restarted=True)

    def _report(
        self, plugins: tuple[PluginStatus, ...], registered: tuple[PluginRegistered, ...]
    ) -> None:
        assert self._link is not None
        self._link.requests.plugins_changed(plugins, registered)
