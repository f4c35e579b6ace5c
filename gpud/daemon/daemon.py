"""The daemon: one event loop, one reconcile loop, every effect on the node routed through it.

Triggers (start-up, a hardware event, ``set-healthy``, a config reload, kubelet restarting, the
GPU driver arriving after gpud started) only change the desired state and ask for a pass;
:meth:`Daemon._reconcile_once` then derives the resource sets from that state and publishes a
:class:`~gpud.node.state.NodeState` snapshot. Its audiences (kubelet's device plugins, the
control API, metrics, labels) are publishers (:mod:`gpud.node.hub`) that the daemon knows only
by that protocol; what they ask of it comes back through the request door it implements
(:class:`gpud.node.requests.NodeRequests`). Hardware events arrive on NVML's thread and are
handed to the loop with ``call_soon_threadsafe``, so state is only ever touched from the loop's
thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

from gpud import __version__
from gpud.config.load import ConfigError
from gpud.config.models import Config, DeviceListStrategy
from gpud.daemon.mig import MigController, Node, label_owns_layout, read_selection, told
from gpud.daemon.notify import Notifier
from gpud.daemon.settings import Settings
from gpud.health import XidPolicy, initial_reasons, unhealthy_reason
from gpud.host import cdi
from gpud.hw.backend import Backend, MigBackend
from gpud.hw.errors import BackendUnavailable, HwError
from gpud.hw.types import NO_INSTANCE, EventKind, GpuInfo, HwEvent, MigLayoutState, SystemInfo
from gpud.mig.planner import Step
from gpud.mig.store import MigStore, Selection, StoreCorrupt
from gpud.node.derive import device_states, health_changes, mig_layouts, sharing_state
from gpud.node.events import (
    BackendLost,
    BackendOpened,
    ConfigReloaded,
    MigApplyStarted,
    MigLayoutApplied,
    MigLayoutFailed,
    MigLayoutRefused,
    MigLayoutWaiting,
    NodeEvent,
    PluginRegistered,
    ToolkitProblem,
    XidSeen,
)
from gpud.node.hub import Publishers
from gpud.node.requests import (
    ORIGIN_CONFIG,
    ORIGIN_LABEL,
    MigRequest,
    Outcome,
    Refused,
    Unavailable,
)
from gpud.node.state import MigLayout, MigStatus, NodeState, PluginStatus, SharingState, XidRecord
from gpud.node.stats import NodeStats
from gpud.resources.mig import caps_reader, mig_uuids_for_event
from gpud.resources.sets import StrategyError, build_resource_sets, still_present
from gpud.resources.types import ResourceSet

log = logging.getLogger(__name__)


_CDI_STRATEGIES = frozenset({DeviceListStrategy.CDI_ANNOTATIONS, DeviceListStrategy.CDI_CRI})


class Daemon:
    """The reconcile loop and the request door of :class:`~gpud.node.requests.NodeRequests`.

    ``cdi_spec`` is where the NVIDIA CDI spec is (re)generated. Publishers are added to
    :attr:`publishers` before :meth:`run` (see :mod:`gpud.daemon.compose`).
    """

    def __init__(
        self, settings: Settings, backend: Backend, *, cdi_spec: Path = cdi.DEFAULT_OUTPUT
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.cdi_spec = cdi_spec
        self.started = time.monotonic()
        self.system = SystemInfo(backend=backend.name)
        self.backend_error = ""
        self.gpus: tuple[GpuInfo, ...] = ()
        self.reasons: dict[str, str] = {}
        self.policy = XidPolicy.from_config(settings.config.health)
        self.notifier = Notifier()
        self.stats = NodeStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty = asyncio.Event()
        self._next_pass: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()
        # Physical GPUs whose devices are withdrawn from kubelet during a MIG layout change.
        self.withdrawn: frozenset[str] = frozenset()
        self.resource_error = ""
        self._warned: tuple[str, ...] = ()
        # What the last pass decided to advertise; kept when the next cannot decide.
        self._advertised: tuple[ResourceSet, ...] = ()
        self._last_xid: dict[str, XidRecord] = {}
        # What the kubelet link last reported, and an event set whenever it reports.
        self._plugins: tuple[PluginStatus, ...] = ()
        self._plugins_reported = asyncio.Event()
        # Events waiting for the next snapshot, which will already reflect them.
        self._pending: list[NodeEvent] = []
        self._mig_status: MigStatus | None = None
        # The Node's nvidia.com/mig.config as the API link reads it (see mig_label).
        self._mig_label: str | None = None
        self._layouts: tuple[dict[int, MigLayoutState] | None, tuple[MigLayout, ...]] = (None, ())
        self._sharing: tuple[Config | None, SharingState] = (None, SharingState())
        self._caps = caps_reader()
        # Set while the backend has no driver: the task that opens it when the driver arrives.
        self._driver_wait: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        # The CDI spec was generated for the GPUs as they are since the backend opened.
        self._cdi_current = False
        self.mig: MigController | None = None
        if isinstance(backend, MigBackend):
            node = Node(
                gpus=lambda: self.gpus,
                pod_resources_socket=lambda: self.settings.pod_resources_socket,
                kubelet_found=self._kubelet_found,
                mig_strategy=lambda: self.settings.config.device_plugin.mig_strategy,
                withdraw=self._withdraw,
                refreshed=self._refresh_inventory,
                layout_changed=self._refresh_cdi,
                finished=self._mig_finished,
                waiting=self._mig_waiting,
                started=self._mig_started,
            )
            self.mig = MigController(backend, MigStore(settings.config.paths.state_dir), node)
            self._mig_status = MigStatus()
        self._published: NodeState | None = None
        self._ready = False
        self._published = self._derive()
        self.publishers = Publishers(self._published, self, self.stats)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._next_pass = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_logged()))

        # The control API first (a second gpud stops here), kubelet's link armed before anything
        # is advertised: both are publishers, started in the order they were added.
        await self.publishers.start()
        await self._open_backend(in_thread=False)
        tasks = [loop.create_task(self._reconcile_loop())]
        for warning in self.settings.warnings:
            log.warning("%s", warning)
        await self._recover_mig()
        await self._ensure_cdi_spec()
        self._ready = True
        await self.reconcile()
        self.notifier.ready(self._status_line())
        self.notifier.start_watchdog(loop)
        log.info("gpud %s ready: %s", __version__, self._status_line())
        if self.backend_error:
            self._await_driver()

        await self._stop.wait()
        log.info("stopping: withdrawing plugins and removing sockets")
        self.notifier.stopping()
        if self._driver_wait is not None:
            tasks.append(self._driver_wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.publishers.stop()
        self.backend.close()
        return 0

    async def _open_backend(self, *, quiet: bool = False, in_thread: bool = True) -> str:
        """Open the backend and read the GPUs, all or nothing; why it failed, "" when it worked.

        A failure after the open closes the backend again, so the next try starts clean (and
        NVML's init count stays balanced). Once gpud runs it opens in a thread: a first
        ``nvmlInit`` on boards without persistence mode takes seconds, and the control API must
        keep answering meanwhile. At start it does not (``in_thread=False``): nothing is served
        yet but the control API, which would answer with GPUs that are merely not read yet.
        """

        def open_and_read() -> tuple[SystemInfo, tuple[GpuInfo, ...]]:
            self.backend.open()
            try:
                system = self.backend.system()
                gpus = tuple(self.backend.gpus())
                self.backend.start_events(self._event_from_any_thread)
            except BaseException:
                self.backend.close()
                raise
            return system, gpus

        gpus: tuple[GpuInfo, ...] = ()
        before = self.backend_error
        try:
            if in_thread:
                self.system, gpus = await asyncio.to_thread(open_and_read)
            else:
                self.system, gpus = open_and_read()
        except BackendUnavailable as exc:
            self.backend_error = f"no driver: {exc}"
            if not quiet:
                log.error("%s; advertising no GPUs until it is fixed", self.backend_error)
        except HwError as exc:
            self.backend_error = str(exc)
            if not quiet:
                log.error("cannot read the GPUs: %s", exc)
        else:
            self.backend_error = ""
            self._cdi_current = False
        if quiet and self.backend_error:
            log.debug("backend not usable yet: %s", self.backend_error)
        self._set_inventory(gpus)
        now = time.time()
        if not self.backend_error:
            self._note(BackendOpened(now, self.system, len(gpus)))
        elif not before:
            self._note(BackendLost(now, self.backend.name, self.backend_error))
        self._publish()
        return self.backend_error

    def _await_driver(self) -> None:
        """Open the backend when its driver arrives, without polling (see driverwatch)."""
        from gpud.daemon.driverwatch import DriverWatch, wait_for_driver

        watch = DriverWatch(self.backend.driver)

        async def wait() -> None:
            watching = asyncio.create_task(watch.run())
            try:
                await wait_for_driver(watch, self._driver_arrived, self._refresh_device_policy)
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
                self._driver_wait = None

        self._driver_wait = asyncio.create_task(wait())

    async def _driver_arrived(self, why: str, *, quiet: bool = True) -> str:
        """Try the backend again; once it opens, do what a start does after its open: restore the
        MIG layout, generate the CDI spec, then advertise. Why not, "" once it worked."""
        async with self._opening:
            if not self.backend_error:
                return ""
            before = self.backend_error
            if await self._open_backend(quiet=quiet):
                if self.backend_error != before:
                    self.notifier.status(self._status_line())
                return self.backend_error
            log.info(
                "GPU driver %s found after gpud started (%s): %d GPUs",
                self.system.driver_version or "(version unknown)",
                why,
                len(self.gpus),
            )
            if self.mig is not None:
                self.mig.recovered.clear()
                await self._recover_mig()
            await self._ensure_cdi_spec("the driver arrived")
            await self.reconcile()
            self.notifier.status(self._status_line())
            return ""

    async def _refresh_device_policy(self, why: str) -> None:
        """Before opening a driver that may have come after gpud.service started: let systemd
        resolve its device groups again (see device_policy), or NVML is refused in the sandbox.
        Also before the check once the watch is armed: a driver that loaded between the unit's
        start and gpud's first open sent its signs before anyone listened."""
        from gpud.daemon.device_policy import APPLIED, FAILED, reapply_own

        result = await asyncio.to_thread(reapply_own)
        if result.status == APPLIED:
            log.info("device policy refreshed for %s: %s", why, result.message)
        elif result.status == FAILED:
            log.warning("%s", result.message)
        else:
            log.debug("device policy not refreshed: %s", result.message)

    async def _recover_mig(self) -> None:
        """Bring MIG to the selected layout before the first advertisement (see MigController)."""
        if self.mig is None:
            return
        if self.backend_error:
            self.mig.recovered.set()
            return
        # A reset can make this take minutes; systemctl status shows why the start waits.
        self.notifier.status("restoring the MIG layout before advertising any device")
        try:
            await self.mig.read_states()
            self._read_mig_status()
            self._publish()
            mig_cfg = self.settings.config.mig
            configured = None
            if mig_cfg.layout:
                configured = read_selection(
                    mig_cfg.layout, None, "", mig_cfg.config_file, ORIGIN_CONFIG
                )
            await self.mig.recover(configured)
        except (StoreCorrupt, Refused, HwError) as exc:
            log.error("MIG layout not restored at start: %s", exc)
        finally:
            self.mig.recovered.set()
            self._read_mig_status()

    def _kubelet_found(self) -> Path | None:
        """kubelet's device-plugin or pod-resources directory when either exists: kubelet is
        installed here, even if it is not running now."""
        for path in (self.settings.kubelet_dir, self.settings.pod_resources_socket.parent):
            if path.is_dir():
                return path
        return None

    async def _withdraw(self, gpu_uuids: frozenset[str]) -> None:
        self.withdrawn = gpu_uuids
        self._read_mig_status()
        await self.reconcile()
        if not gpu_uuids:
            # The MIG change is over: report it once kubelet knows any new resources.
            await self._registrations_settled(timeout=5.0)

    async def _registrations_settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` until the kubelet link reports no registration in flight, so
        that a caller who changed the resources answers once kubelet knows them; a kubelet that
        is slow or away does not hold the caller longer (the registrations go on)."""
        deadline = time.monotonic() + timeout
        while any(p.registering for p in self._plugins):
            self._plugins_reported.clear()
            try:
                await asyncio.wait_for(
                    self._plugins_reported.wait(), max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                return

    async def _refresh_cdi(self, after: str = "the MIG change") -> None:
        """Regenerate the CDI spec: MIG device names in it follow the layout, and the spec lives
        in /var/run, which a reboot empties.

        Only on real GPUs: nvidia-ctk describes the node's actual devices, not simulated ones.
        """
        if self.backend.name != "nvml":
            return
        result = await asyncio.to_thread(cdi.refresh_after_mig_change, output=self.cdi_spec)
        if result.status == cdi.FAILED:
            log.warning("CDI spec not refreshed after %s: %s", after, result.message)
        elif result.status == cdi.GENERATED:
            self._cdi_current = True
            log.info("CDI spec refreshed after %s: %s", after, result.message)
        elif result.status == cdi.SKIPPED and self._uses_cdi():
            problem = (
                "devicePlugin.deviceListStrategy hands out CDI device names, but nvidia-ctk is not "
                "installed, so there is no CDI spec and containers given those names fail to "
                "start: install the toolkit (sudo gpudctl toolkit install) or use the envvar "
                "strategy"
            )
            log.error("%s", problem)
            self._note(ToolkitProblem(time.time(), problem))

    def _uses_cdi(self) -> bool:
        return bool(_CDI_STRATEGIES & set(self.settings.config.device_plugin.device_list_strategy))

    async def _ensure_cdi_spec(self, after: str = "the start") -> None:
        """Generate the CDI spec once per backend open when the device-list strategy hands out
        CDI names: a spec in /var/run/cdi is gone after a reboot, and toolkits before 1.18 do not
        make it again. A MIG restore that just generated it is not repeated."""
        if self.backend_error or self._cdi_current or not self._uses_cdi():
            return
        await self._refresh_cdi(after)

    async def _refresh_inventory(self) -> None:
        """After a MIG change: the GPUs' MIG modes (and, after a reset, handles) are new."""
        try:
            gpus = tuple(await asyncio.to_thread(self.backend.gpus))
        except HwError as exc:
            log.error("cannot re-read the GPUs after a MIG change: %s", exc)
            return
        self._set_inventory(gpus)

    def _set_inventory(self, gpus: tuple[GpuInfo, ...]) -> None:
        self.gpus = gpus
        states = self.mig.node.states if self.mig is not None else {}
        mig_uuids = {
            ci.mig_uuid
            for state in states.values()
            for gi in state.instances
            for ci in gi.compute_instances
        }
        self.reasons = initial_reasons(gpus, self.reasons, mig_uuids)
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
        if self.mig is not None and not self.mig.recovered.is_set():
            # Nothing new is advertised before the MIG layout is restored (see run); the
            # snapshot still shows the GPUs and the health meanwhile.
            self._publish()
            return
        cfg = self.settings.config
        unhealthy = dict(self.reasons)
        for uuid in self.withdrawn:
            unhealthy.setdefault(uuid, "withdrawn while its MIG layout changes")
        states = self.mig.node.states if self.mig is not None else {}
        try:
            built = build_resource_sets(
                self.gpus,
                states,
                unhealthy,
                cfg.device_plugin.mig_strategy,
                cfg.sharing,
                self._caps,
            )
        except StrategyError as exc:
            if str(exc) != self.resource_error:
                log.error("cannot advertise this node's devices: %s", exc)
            self.resource_error = str(exc)
            # Keep what kubelet has rather than take everything away, but not the devices that
            # are gone: kubelet would hand a destroyed instance's ID to the next pod.
            self._advertised = still_present(self._advertised, self.gpus, states, unhealthy)
            self._publish()
            await self.publishers.delivered()
            return
        self.resource_error = ""
        if built.warnings != self._warned:
            for warning in built.warnings:
                log.warning("%s", warning)
            self._warned = built.warnings
        self._advertised = built.sets
        self._publish()
        await self.publishers.delivered()
        self.notifier.status(self._status_line())

    def _status_line(self) -> str:
        if self.backend_error:
            return self.backend_error
        healthy = sum(1 for g in self.gpus if g.uuid not in self.reasons)
        return f"{healthy}/{len(self.gpus)} GPUs healthy, {len(self._plugins)} plugins"

    # ---- the snapshot ------------------------------------------------------------------------

    def _note(self, event: NodeEvent) -> None:
        """Keep ``event`` for the next snapshot, which will reflect it."""
        self._pending.append(event)

    def _publish(self) -> NodeState:
        """Derive a snapshot from the state as it is now and hand it, with the events noted
        since the last one and the health changes between the two, to every publisher."""
        state = self._derive()
        events = [*self._pending, *health_changes(self._published, state, time.time())]
        self._pending.clear()
        self._published = state
        self.publishers.publish(state, events)
        return state

    def _derive(self) -> NodeState:
        states = self.mig.node.states if self.mig is not None else {}
        if self._layouts[0] is not states:
            self._layouts = (states, mig_layouts(states))
        layouts = () if self.backend_error else self._layouts[1]
        cfg = self.settings.config
        if self._sharing[0] is not cfg:
            self._sharing = (cfg, sharing_state(cfg.sharing))
        mig_status = self._mig_status
        if self.mig is not None and mig_status is not None:
            held_s, held_by = self.mig.longest_hold
            mig_status = dataclasses.replace(
                mig_status,
                lock_longest_held_s=held_s,
                lock_longest_held_by=held_by,
                label=self._mig_label or "",
            )
        previous = self._published.generation if self._published is not None else 0
        return NodeState(
            generation=previous + 1,
            version=__version__,
            started=self.started,
            config=cfg,
            config_file=self.settings.config_file,
            kubelet_dir=self.settings.kubelet_dir,
            pod_resources_socket=self.settings.pod_resources_socket,
            system=self.system,
            backend_error=self.backend_error,
            gpus=self.gpus,
            unhealthy=MappingProxyType(dict(self.reasons)),
            devices=device_states(self.gpus, layouts, self.reasons, self.withdrawn, self._last_xid),
            mig=layouts,
            mig_status=mig_status,
            withdrawn=self.withdrawn,
            resources=self._advertised,
            resource_error=self.resource_error,
            resource_warnings=self._warned,
            sharing=self._sharing[1],
            plugins=self._plugins,
            ready=self._ready,
        )

    def _read_mig_status(self) -> None:
        """What the MIG store says about the selected layout and the last apply (small files,
        read only when an apply or a restore may have changed them)."""
        if self.mig is None:
            return
        store = self.mig.store
        try:
            selection, journal = store.selection(), store.journal()
        except StoreCorrupt as exc:
            self._mig_status = MigStatus(store_error=str(exc))
            return
        status = MigStatus()
        if selection is not None:
            status = dataclasses.replace(
                status,
                selected=selection.name,
                selected_source=selection.source,
                selected_origin=selection.origin,
            )
        if journal is not None:
            status = dataclasses.replace(
                status,
                last_apply=journal.status,
                last_layout=journal.selection.name,
                last_error=journal.error,
            )
        self._mig_status = status

    def _mig_started(
        self, selection: Selection, steps: Sequence[Step], withdrawn: tuple[str, ...]
    ) -> None:
        gpus = tuple(sorted({s.gpu for s in steps}))
        self._note(
            MigApplyStarted(
                time.time(), selection.name, told(selection), len(steps), gpus, withdrawn
            )
        )
        self._publish()

    def _mig_finished(
        self, selection: Selection, dry_run: bool, outcome: Outcome, seconds: float
    ) -> None:
        """Count every MIG apply and announce those that changed, failed or were refused."""
        result = outcome.result
        if result == "failed":
            result = "failed" if outcome.error_kind == "error" else outcome.error_kind
        self.stats.mig_applied(result, seconds, outcome.mutations)
        now = time.time()
        gpus = tuple(sorted({s.gpu for s in outcome.steps}))
        name, source = selection.name, told(selection)
        if outcome.result == "applied":
            self._note(
                MigLayoutApplied(
                    now, name, source, outcome.mutations, seconds, gpus, outcome.message
                )
            )
        elif outcome.result == "failed" and outcome.error_kind == "error":
            self._note(
                MigLayoutFailed(
                    now, name, source, outcome.mutations, seconds, gpus, outcome.message
                )
            )
        elif outcome.result == "failed" and not dry_run:
            self._note(
                MigLayoutRefused(
                    now, name, source, outcome.error_kind, outcome.message, outcome.in_use_by
                )
            )
        self._read_mig_status()
        self._publish()

    def _mig_waiting(self, selection: Selection, in_use_by: tuple[str, ...], left_s: float) -> None:
        log.warning(
            "MIG layout %r waits up to %.0f s for its devices to be free: %s",
            selection.name,
            left_s,
            "; ".join(in_use_by),
        )
        self._note(
            MigLayoutWaiting(time.time(), selection.name, told(selection), left_s, in_use_by)
        )
        self._publish()

    # ---- triggers ----------------------------------------------------------------------------

    def _event_from_any_thread(self, event: HwEvent) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.handle_event, event)

    def handle_event(self, event: HwEvent) -> str | None:
        """Record what a hardware event means for its GPU; returns the unhealthy reason if any.

        Every XID is recorded as its devices' last (what dcgm-exporter reports) and counted,
        application XIDs included; only the others take devices out of service.
        """
        reason = unhealthy_reason(event, self.policy)
        extra = {"GPU_UUID": event.uuid, "XID": event.xid}
        gpu = next((g for g in self.gpus if g.uuid == event.uuid), None)
        targets: tuple[str, ...] = (event.uuid,)
        scoped = event.gi_id != NO_INSTANCE
        if gpu is not None and scoped:
            state = self.mig.node.states.get(gpu.index) if self.mig is not None else None
            targets = (mig_uuids_for_event(state, event.gi_id, event.ci_id) if state else ()) or (
                event.uuid,
            )
        if gpu is not None and event.kind is EventKind.XID:
            self._record_xid(gpu, event, targets, critical=reason is not None)
        if reason is None:
            log.info("ignored XID %d (application error)", event.xid, extra=extra)
            if gpu is not None:
                self._publish()
            return None
        if gpu is None:
            log.warning("event for unknown GPU: %s", reason, extra=extra)
            return None
        log.error("GPU unhealthy: %s", reason, extra=extra)
        if scoped and targets == (event.uuid,):
            log.warning(
                "XID %d is scoped to GPU instance %d, which GPU %d does not hold (now); "
                "taking the whole GPU out of service",
                event.xid,
                event.gi_id,
                gpu.index,
                extra=extra,
            )
        for uuid in targets:
            self.reasons[uuid] = reason
        if event.kind is EventKind.GPU_LOST:
            self.gpus = tuple(
                dataclasses.replace(g, lost=True) if g.uuid == event.uuid else g for g in self.gpus
            )
        self._dirty.set()
        return reason

    def _record_xid(
        self, gpu: GpuInfo, event: HwEvent, devices: tuple[str, ...], critical: bool
    ) -> None:
        now = time.time()
        record = XidRecord(event.xid, now, critical, event.detail)
        for uuid in devices:
            self._last_xid[uuid] = record
        self.stats.xid_seen(gpu.uuid, event.xid)
        scoped = event.gi_id != NO_INSTANCE
        self._note(
            XidSeen(
                at=now,
                gpu_uuid=gpu.uuid,
                gpu_index=gpu.index,
                xid=event.xid,
                devices=devices,
                critical=critical,
                gi_id=event.gi_id if scoped else None,
                ci_id=event.ci_id if scoped and event.ci_id != NO_INSTANCE else None,
                detail=event.detail,
            )
        )

    async def set_healthy(self, uuid: str) -> tuple[GpuInfo, str]:
        """Return a GPU (with all its MIG devices) or one MIG device to service; the GPU and what
        happened. LookupError, with what to do, when it cannot be (the GPU is lost, or the MIG
        device's GPU is itself out of service)."""
        gpu = self.gpu_by_uuid(uuid)
        if gpu.lost:
            raise LookupError(
                f"GPU {gpu.index} ({gpu.uuid}) is lost to NVML; reset it or reboot, then try again"
            )
        if uuid != gpu.uuid and gpu.uuid in self.reasons:
            raise LookupError(
                f"{uuid} is on GPU {gpu.index} ({gpu.uuid}), which is itself out of service "
                f"({self.reasons[gpu.uuid]}); its MIG devices stay Unhealthy with it and nothing "
                f"was changed. Once the GPU is repaired: sudo gpudctl device set-healthy {gpu.uuid}"
            )
        cleared = {uuid}
        if uuid == gpu.uuid and self.mig is not None and gpu.index in self.mig.node.states:
            state = self.mig.node.states[gpu.index]
            cleared |= {ci.mig_uuid for gi in state.instances for ci in gi.compute_instances}
        was_out = [u for u in sorted(cleared) if self.reasons.pop(u, None) is not None]
        what = f"GPU {gpu.index} ({gpu.uuid})" if uuid == gpu.uuid else f"{uuid} (GPU {gpu.index})"
        if was_out:
            log.info("returned to service by the operator", extra={"GPU_UUID": uuid})
            message = f"{what} is back in service"
        else:
            message = f"{what} was not out of service; nothing changed"
        await self.reconcile()
        return gpu, message

    def gpu_by_uuid(self, uuid: str) -> GpuInfo:
        """The physical GPU of a GPU or MIG UUID; KeyError when neither is on this node."""
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        states = self.mig.node.states if self.mig is not None else {}
        for index, state in states.items():
            if any(ci.mig_uuid == uuid for gi in state.instances for ci in gi.compute_instances):
                return next(g for g in self.gpus if g.index == index)
        raise KeyError(uuid)

    async def reload(self) -> Path | None:
        """Re-read the config; raises ConfigError and keeps the running config when it is bad."""
        self.notifier.reloading()
        try:
            fresh = self.settings.reload()
        except ConfigError as exc:
            self.stats.config_reloaded(ok=False)
            self._note(ConfigReloaded(time.time(), str(self.settings.config_file or ""), str(exc)))
            self._publish()
            self.notifier.reloaded(self._status_line())
            raise
        old = self.settings
        for what, before, after in (
            ("backend", old.config.backend, fresh.config.backend),
            ("simulate", old.config.simulate, fresh.config.simulate),
            ("paths.stateDir", old.config.paths.state_dir, fresh.config.paths.state_dir),
            ("paths.socket", old.config.paths.socket, fresh.config.paths.socket),
            ("kubelet directory", old.kubelet_dir, fresh.kubelet_dir),
            ("allocation.mode", old.config.allocation.mode, fresh.config.allocation.mode),
            ("dra", old.config.dra, fresh.config.dra),
        ):
            if before != after:
                log.warning(
                    "%s changed (%s -> %s): takes effect after a restart", what, before, after
                )
        self.settings = dataclasses.replace(
            fresh,
            config=fresh.config.model_copy(
                update={
                    "backend": old.config.backend,
                    "simulate": old.config.simulate,
                    "paths": old.config.paths,
                    # The kubelet API is chosen at start: one API per node, switched cleanly.
                    "allocation": old.config.allocation,
                    "dra": old.config.dra,
                }
            ),
            kubelet_dir=old.kubelet_dir,
            kubelet_reason=old.kubelet_reason,
            pod_resources_socket=old.pod_resources_socket,
        )
        for warning in fresh.warnings:
            log.warning("%s", warning)
        self.policy = XidPolicy.from_config(self.settings.config.health)
        self.stats.config_reloaded(ok=True)
        self._note(ConfigReloaded(time.time(), str(fresh.config_file or "")))
        if self.backend_error:
            await self._refresh_device_policy("the configuration reload")
            opened = not await self._driver_arrived("configuration reload", quiet=False)
            if opened and self._driver_wait is not None:
                self._driver_wait.cancel()
        await self.reconcile()
        self.notifier.reloaded(self._status_line())
        log.info("configuration reloaded from %s", fresh.config_file or "defaults")
        return fresh.config_file

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)

    # ---- the rest of the request door (gpud.node.requests.NodeRequests) ----------------------

    def _mig_or_unavailable(self) -> MigController:
        if self.mig is None or self.backend_error:
            raise Unavailable(self.backend_error or "this backend cannot do MIG")
        return self.mig

    def _selection(self, request: MigRequest) -> Selection:
        return read_selection(
            request.config_name,
            request.config_yaml,
            request.config_source,
            self.settings.config.mig.config_file,
            request.origin,
        )

    async def apply_mig(self, request: MigRequest) -> Outcome:
        mig = self._mig_or_unavailable()
        try:
            selection = self._selection(request)
            label = self._mig_label
            if label is not None and request.origin != ORIGIN_LABEL and not request.dry_run:
                raise Refused(label_owns_layout(label), "refused")
        except Refused as exc:
            outcome = Outcome("failed", message=str(exc), error_kind=exc.kind)
            unread = Selection(request.config_name, "", request.config_source, request.origin)
            self._mig_finished(unread, request.dry_run, outcome, 0.0)
            return outcome
        return await mig.apply(selection, request.dry_run, request.force, request.wait_for_pods_s)

    def mig_label(self, value: str | None) -> None:
        if value == self._mig_label:
            return
        if value is None:
            log.info("no nvidia.com/mig.config on the Node: gpudctl mig apply chooses the layout")
        else:
            log.info("the Node label nvidia.com/mig.config=%s chooses the MIG layout", value)
        self._mig_label = value
        self._publish()

    async def assert_mig(self, request: MigRequest) -> tuple[str, ...]:
        return await self._mig_or_unavailable().differences(self._selection(request))

    async def refresh_mig(self) -> NodeState:
        if self.mig is None or self.backend_error:
            return self.publishers.latest()
        before = self.mig.node.states
        after = await self.mig.current_states()
        self._read_mig_status()
        if after != before:
            # Changed behind gpud's back (nvidia-smi): advertise what is there now.
            await self.reconcile()
            return self.publishers.latest()
        return self._publish()

    async def reconciled(self) -> NodeState:
        await self.reconcile()
        return self.publishers.latest()

    def plugins_changed(
        self, plugins: tuple[PluginStatus, ...], registered: tuple[PluginRegistered, ...] = ()
    ) -> None:
        self._plugins = plugins
        for event in registered:
            self._note(event)
        self._plugins_reported.set()
        self._publish()
