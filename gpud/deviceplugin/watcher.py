"""Follows kubelet's device-plugin directory with inotify.

kubelet signals its restart only through the file system: it deletes the sockets in the directory
and creates ``kubelet.sock`` anew. Watching for that (instead of polling) is what lets gpud
re-register within milliseconds and cost nothing while idle. If the directory does not exist yet
(kubelet not installed or not started), the nearest existing parent is watched until it appears.
The DRA plugin watches kubelet's ``plugins_registry`` the same way, with no trigger file: there
only a removed socket or a re-created directory asks for action.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from asyncinotify import Inotify, Mask

from gpud.deviceplugin.plugin import KUBELET_SOCKET

log = logging.getLogger(__name__)

_DIR_EVENTS = (
    Mask.CREATE
    | Mask.DELETE
    | Mask.MOVED_TO
    | Mask.MOVED_FROM
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
)
_PARENT_EVENTS = Mask.DELETE | Mask.MOVED_FROM | Mask.ONLYDIR
_GONE = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED | Mask.UNMOUNT


class KubeletDirWatcher:
    def __init__(
        self,
        plugin_dir: Path,
        kubelet_started: Callable[[], Awaitable[None]],
        socket_removed: Callable[[str], Awaitable[None]],
        trigger: str | None = KUBELET_SOCKET,
    ) -> None:
        """``kubelet_started`` runs when ``trigger`` is created in the directory, and when the
        directory comes (back) while gpud runs."""
        self.plugin_dir = plugin_dir
        self._trigger = trigger
        self._kubelet_started = kubelet_started
        self._socket_removed = socket_removed
        self.armed = asyncio.Event()

    async def run(self) -> None:
        first = True
        while True:
            if self.plugin_dir.is_dir():
                await self._watch_dir(catch_up=not first)
            else:
                await self._wait_for_dir()
            first = False

    async def _watch_dir(self, catch_up: bool) -> None:
        """Watch the directory, and its parent for the directory's own removal.

        The parent's DELETE is what tells reliably that the directory went: overlayfs (nodes and
        containers with an overlay root) may not report DELETE_SELF, and a directory recreated
        after an unnoticed removal is a new inode that this watch would never see.
        """
        with Inotify() as inotify:
            try:
                mine = inotify.add_watch(self.plugin_dir, _DIR_EVENTS)
                inotify.add_watch(self.plugin_dir.parent, _PARENT_EVENTS)
            except OSError as exc:
                log.warning("cannot watch %s: %s", self.plugin_dir, exc)
                await asyncio.sleep(1)
                return
            self.armed.set()
            if catch_up:
                # The directory came (back) while nobody watched it: what a new kubelet does.
                await self._kubelet_started()
            async for event in inotify:
                name = str(event.name) if event.name is not None else ""
                if event.watch is not mine:
                    if name == self.plugin_dir.name:
                        log.info("kubelet directory %s went away; waiting for it", self.plugin_dir)
                        return
                    continue
                if event.mask & _GONE:
                    log.info("kubelet directory %s went away; waiting for it", self.plugin_dir)
                    return
                if event.mask & (Mask.CREATE | Mask.MOVED_TO) and name == self._trigger:
                    log.info("%s created: kubelet (re)started; registering again", name)
                    await self._kubelet_started()
                elif event.mask & (Mask.DELETE | Mask.MOVED_FROM) and name.endswith(".sock"):
                    await self._socket_removed(name)

    async def _wait_for_dir(self) -> None:
        parent = self.plugin_dir.parent
        while not parent.is_dir():
            parent = parent.parent
        with Inotify() as inotify:
            try:
                inotify.add_watch(parent, Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR | _GONE)
            except OSError as exc:
                log.warning("cannot watch %s: %s", parent, exc)
                await asyncio.sleep(1)
                return
            self.armed.set()
            log.info("waiting for %s to appear (watching %s)", self.plugin_dir, parent)
            if self.plugin_dir.is_dir() or not parent.is_dir():
                return
            async for event in inotify:
                if event.mask & _GONE or self.plugin_dir.is_dir():
                    return
                if event.name is not None and (parent / event.name).is_dir():
                    # A step of the path appeared; watch one level deeper.
                    return
