"""Noticing the GPU driver arrive while gpud runs without it, at no cost while nothing happens.

gpud is ordered after ``systemd-modules-load``, but nvidia.ko often loads later (udev's coldplug,
a DKMS build finishing, ``gpud bootstrap`` or an operator installing the driver while gpud
runs). Rather than poll NVML, gpud listens to what the kernel and udev do anyway:

- the kernel's uevents (a netlink socket, through pyudev): ``add`` of ``/module/nvidia``, sent
  once the module's init has returned, ``add`` of its PCI driver, and ``bind`` of each GPU;
- inotify on ``/dev`` for ``nvidiactl``, which udev's rules or ``nvidia-modprobe`` create once
  the module is there. This is the fallback where uevents do not reach gpud (a container in its
  own network namespace, a kernel without uevents for modules).

Either is only a sign: the daemon then tries to open NVML, and retries a failed try a few times
over some seconds (:data:`RETRY_DELAYS_S`), because the signs come in a burst while the driver is
still settling (udev creating nodes, persistence mode starting). Then it waits for the next sign.
The watch runs only while the driver is missing: an open NVML pins the module (``rmmod`` answers
"in use"), so the driver cannot go away under it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncinotify import Inotify, Mask

from gpud.hw.backend import DriverSignals

log = logging.getLogger(__name__)

RETRY_DELAYS_S: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Waits before each retry of a failed open after a sign: about 9 s in all, the time udev's rules
and a first ``nvmlInit`` on a board without persistence mode take, then nothing until the next
sign."""


@dataclass(frozen=True)
class Uevent:
    """The fields of a kernel uevent that say whether a driver arrived."""

    action: str
    subsystem: str
    devpath: str
    driver: str = ""


def announces(event: Uevent, module: str) -> str | None:
    """What ``event`` says about ``module``'s driver arriving, or None when it says nothing.

    The module's own ``add`` comes after its init returned (the GPUs are probed by then); its PCI
    driver's ``add`` and a GPU's ``bind`` say the same from the bus's side, and also come when a
    GPU is rebound later (after vfio-pci, a hot-plug or a PCI rescan).
    """
    if event.action == "add":
        if event.subsystem == "module" and event.devpath == f"/module/{module}":
            return f"kernel module {module} loaded"
        if event.subsystem == "drivers" and event.devpath.endswith(f"/drivers/{module}"):
            return f"driver {event.devpath} registered"
    elif event.action == "bind" and event.driver == module:
        return f"{event.devpath} bound to {module}"
    return None


class DriverWatch:
    """Watches for signs of the driver until cancelled; :meth:`next` hands them out one burst at a
    time. ``armed`` is set once both sources listen (or failed to, logged), so a sign that comes
    after it is never lost."""

    def __init__(self, signals: DriverSignals) -> None:
        self.signals = signals
        self.armed = asyncio.Event()
        self._sign = asyncio.Event()
        self._why = ""

    async def next(self, timeout: float | None = None) -> str | None:
        """Wait for a sign (at most ``timeout`` seconds); what it was, or None when none came.

        Signs that arrived since the last call are coalesced into the latest one.
        """
        try:
            await asyncio.wait_for(self._sign.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        self._sign.clear()
        return self._why

    def _saw(self, why: str) -> None:
        log.info("sign of the GPU driver: %s", why)
        self._why = why
        self._sign.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        monitor = _kernel_monitor()
        if monitor is not None:
            loop.add_reader(monitor.fileno(), self._read_uevents, monitor)
        try:
            with Inotify() as inotify:
                dev_dir = self.signals.dev_dir
                try:
                    inotify.add_watch(dev_dir, Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR)
                except OSError as exc:
                    log.warning("cannot watch %s for the driver's device nodes: %s", dev_dir, exc)
                    self.armed.set()
                    await asyncio.Event().wait()  # uevents only, until cancelled
                    return
                self.armed.set()
                async for event in inotify:
                    if event.name is not None and str(event.name) == self.signals.control_node:
                        self._saw(f"{self.signals.control_path} created")
        finally:
            if monitor is not None:
                loop.remove_reader(monitor.fileno())

    def _read_uevents(self, monitor: Any) -> None:
        try:
            while (device := monitor.poll(timeout=0)) is not None:
                event = Uevent(
                    action=device.action or "",
                    subsystem=device.subsystem or "",
                    devpath=device.device_path or "",
                    driver=device.driver or "",
                )
                why = announces(event, self.signals.module)
                if why is not None:
                    self._saw(why)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                # The kernel dropped uevents while we were busy; any of them may have been the
                # one, so the loss itself is a sign.
                self._saw(f"uevents lost ({exc})")
                return
            # Anything else would repeat on every wake-up: keep the /dev watch only.
            log.warning(
                "kernel uevents failed (%s); watching for the driver's device node only", exc
            )
            asyncio.get_running_loop().remove_reader(monitor.fileno())


def _kernel_monitor() -> Any:
    """A started pyudev monitor of the kernel's uevents; None (logged) where there is none.

    The kernel source, not udev's: it reaches every listener whether or not systemd-udevd runs
    (containers, early boot), and it comes first; the /dev watch covers what udev does after.
    """
    try:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        monitor.start()
    except (ImportError, OSError) as exc:
        log.warning("no kernel uevents (%s); watching for the driver's device node only", exc)
        return None
    return monitor


async def wait_for_driver(
    watch: DriverWatch,
    attempt: Callable[[str], Awaitable[str]],
    prepare: Callable[[str], Awaitable[None]],
    retry_delays: Sequence[float] = RETRY_DELAYS_S,
) -> None:
    """Return once ``attempt(sign)`` (open the backend; answers why it could not, "" once it did)
    has succeeded.

    One attempt once ``watch`` is armed, for a driver that came between the caller's failed open
    and the arming (its signs went unheard); then one after each sign, retried after each of
    ``retry_delays`` while it fails. A new sign cuts a wait short. ``prepare`` runs before the
    first attempt of each of these.
    """
    await watch.armed.wait()
    why = "a check once the driver watch was armed"
    await prepare(why)
    if not await attempt(why):
        return
    log.info(
        "no GPU driver yet; waiting for it (kernel uevents of module %s, %s)",
        watch.signals.module,
        watch.signals.control_path,
    )
    while True:
        sign = await watch.next()
        assert sign is not None
        await prepare(sign)
        error = await attempt(sign)
        for delay in retry_delays:
            if not error:
                return
            await watch.next(timeout=delay)
            error = await attempt(sign)
        if not error:
            return
        log.warning(
            "the GPU driver showed itself (%s) but cannot be used: %s; waiting for the next sign "
            "of it (or `systemctl reload gpud`)",
            sign,
            error,
        )
