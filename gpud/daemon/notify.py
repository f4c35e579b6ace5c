"""systemd's notification protocol: READY, STATUS, STOPPING and the watchdog.

Everything is a no-op outside systemd (no NOTIFY_SOCKET), and the watchdog timer exists only when
systemd asked for one, so an idle gpud started by hand wakes up for nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


def _sender() -> Callable[[str], object] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon
    except ImportError:
        log.warning("NOTIFY_SOCKET is set but systemd-python is missing; systemd will time out")
        return None
    return daemon.notify


class Notifier:
    def __init__(self) -> None:
        self._send = _sender()
        self._watchdog: asyncio.TimerHandle | None = None

    def _notify(self, message: str) -> None:
        if self._send is not None:
            self._send(message)

    def ready(self, status: str) -> None:
        self._notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._notify(f"STATUS={status}")

    def reloading(self) -> None:
        self._notify("RELOADING=1")

    def reloaded(self, status: str) -> None:
        self._notify(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self._notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.cancel()

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping from the event loop itself, so a wedged loop is what systemd detects."""
        usec = os.environ.get("WATCHDOG_USEC")
        if self._send is None or not usec or not usec.isdigit():
            return
        interval = int(usec) / 2e6

        def ping() -> None:
            self._notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        ping()
