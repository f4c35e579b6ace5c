"""The link to the API server as a publisher: gpud's labels on its own Node.

Each snapshot's labels (GPU Feature Discovery's and ``labels.static``,
:func:`gpud.labels.snapshot.snapshot_labels`) less those NodeRestriction refuses a kubelet
credential are applied to the Node with server-side apply under field manager "gpud": what gpud
stops publishing disappears, what others set stays. An apply is sent only when the wanted set
differs from the last one the API server accepted, so an unchanged node sends nothing.

The same link sends Events about the node (:mod:`gpud.kube.report`, rate-limited by
:mod:`gpud.kube.ratelimit`, queued in :mod:`gpud.kube.outbox` so that an API server that is away
loses none and a retry duplicates none) and keeps the node condition ``GPUHealthy``
(:mod:`gpud.kube.condition`) on the Node's status: applied when it changes, and every
:data:`HEARTBEAT_S` so that its lastHeartbeatTime shows gpud is alive.

A failure raises, so the hub shows the link degraded with the sentence from
:func:`gpud.kube.client.explain` and retries with backoff; nothing here ever holds kubelet's link
up. At start the link waits (at most :data:`REGISTRATION_WAIT_S`) until kubelet has the device
plugins, and only then loads the client library, in a worker thread.

Without credentials the link is off and ``gpudctl status`` says why; with ``kubernetes.enabled:
true`` that is an error, retried (a node that joins the cluster after gpud started gets its
kubelet kubeconfig then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpud.config.models import AllocationMode, Kubernetes
from gpud.kube import access as kube_access
from gpud.kube.access import Access
from gpud.kube.client import KubeError, NodeReplaced
from gpud.kube.condition import CONDITION_TYPE, GpuCondition, gpu_condition
from gpud.kube.outbox import Outbox, event_body
from gpud.kube.ratelimit import EventLimiter, Passed
from gpud.kube.report import Report, reports
from gpud.kube.restriction import kubelet_allowed
from gpud.node.events import NodeEvent
from gpud.node.hub import MAX_EVENTS, PublisherLink, Update
from gpud.node.state import NodeState

if TYPE_CHECKING:
    from gpud.dra.publish import SliceSync
    from gpud.kube.client import KubeClient
    from gpud.kube.miglabel import MigByLabel

log = logging.getLogger(__name__)

REGISTRATION_WAIT_S = 10.0
# While off for want of credentials, look for the kubelet's kubeconfig again this often: a node
# often joins the cluster after gpud was installed (cloud-init, then kubeadm join).
RECHECK_S = 60.0
_POLL_S = 0.05
# The condition is applied again this often when nothing changed, so that lastHeartbeatTime
# tells gpud is alive (kubelet's own node status goes every 5 minutes when nothing changes).
HEARTBEAT_S = 300.0


@dataclass(frozen=True, slots=True)
class _SentCondition:
    condition: GpuCondition
    since: str  # lastTransitionTime as sent
    at: float  # time.monotonic() of the apply


class LinkOff(Exception):
    """The operator asked for the link (``kubernetes.enabled: true``) and it cannot run."""


def registration_pending(state: NodeState) -> bool:
    """Whether kubelet is still being handed a resource: a resource with no plugin status yet,
    or one whose registration is in flight. A plugin that failed (no kubelet) is not pending.
    In DRA mode no device plugin runs, so nothing is pending."""
    if state.config.allocation.mode is AllocationMode.DRA:
        return False
    settled = {p.resource for p in state.plugins if p.registered or (p.error and not p.registering)}
    return any(rs.resource not in settled for rs in state.resources)


class KubernetesPublisher:
    name = "kubernetes"

    def __init__(
        self,
        resolve: Callable[[Kubernetes], Access] = kube_access.resolve,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self._resolve = resolve
        self.recheck_s = recheck_s
        self._settings: Kubernetes | None = None
        self._access = Access(None, off_reason="not started")
        self._client: KubeClient | None = None
        self._uid = ""
        # The label set the API server last accepted for self._uid; None: nothing applied yet.
        self._applied: Mapping[str, str] | None = None
        self._warnings: tuple[str, ...] = ()
        self._facts: tuple[tuple[str, ...], str | None, Mapping[str, int]] | None = None
        self._waited = False
        self._recheck: asyncio.TimerHandle | None = None
        self._mig: MigByLabel | None = None
        # Events: the rate limit, what is waiting to go, and the node events already taken
        # (the hub hands a failed update's events back; they must not be queued twice).
        self._limiter: EventLimiter[Report] = EventLimiter(time.monotonic())
        self._outbox: Outbox | None = None
        self._taken: OrderedDict[int, NodeEvent] = OrderedDict()
        self._driver_lost = False
        self._events_sent = 0
        self._events_lost = 0
        # The condition: what the Node had when gpud looked it up, and what gpud last applied.
        self._found_condition = ("", "")
        self._condition: _SentCondition | None = None
        self._wake: asyncio.TimerHandle | None = None
        # DRA: the pool kept while allocation.mode is dra; the drivers whose slices of this
        # node are to be deleted (a mode or driver change; at start, what an earlier run left).
        self._slices: SliceSync | None = None
        self._unpublish: set[str] | None = None
        self.sys_root = Path("/sys")

    async def start(self, link: PublisherLink) -> None:
        """Nothing is read before kubelet has its plugins (see :meth:`_await_registration`)."""
        self.link = link
        link.set_detail("starting after kubelet's device-plugin registration")

    async def publish(self, update: Update) -> None:
        """Make the Node's labels match the newest snapshot (``update``'s or a later one)."""
        if not self._waited:
            await self._await_registration()
        state = self.link.latest()
        settings = state.config.kubernetes
        if settings != self._settings or not self._access.on:
            await self._reconfigure(settings)
        if not self._access.on:
            if self._access.required:
                raise LinkOff(f"the API link is off: {self._access.off_reason}")
            if settings.enabled is None and self._recheck is None:
                loop = asyncio.get_running_loop()
                self._recheck = loop.call_later(self.recheck_s, self._look_again)
            return
        await self._follow_mig_label(state)
        self._take(update)
        wanted, warnings = self._wanted(state)
        if warnings != self._warnings:
            for warning in warnings:
                log.warning("%s", warning)
            self._warnings = warnings
        # Events first (they should reach the cluster within a second), then the condition,
        # then the labels; one failing does not hold back the others.
        failed: list[KubeError] = []
        for step in (
            self._send_events,
            lambda: self._keep_condition(state),
            lambda: self._keep_labels(wanted),
            lambda: self._keep_slices(state),
        ):
            try:
                await step()
            except KubeError as exc:
                failed.append(exc)
        self._arm_wake()
        self._show()
        if failed:
            raise failed[0]

    async def stop(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._mig is not None:
            await self._mig.stop()
            self._mig = None
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if self._slices is not None:
            # Left in place: a restarted gpud finds them equal and sends nothing; kubelet
            # deletes them 30 s after the DRA plugin is gone for good.
            await self._slices.stop()
            self._slices = None
        self._unpublish = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ---- internals -----------------------------------------------------------------------------

    def _look_again(self) -> None:
        self._recheck = None
        self.link.republish()

    def _configure(self, settings: Kubernetes) -> None:
        self._settings = settings
        access = self._resolve(settings)
        if access != self._access:
            log.info("API link: %s", access.describe())
        self._access = access
        self._show()

    async def _reconfigure(self, settings: Kubernetes) -> None:
        before = self._access
        self._configure(settings)
        if self._access != before:
            await self.stop()
            self._forget_node()
            self._outbox = Outbox(self._access.node_name) if self._access.on else None

    async def _await_registration(self) -> None:
        """Let kubelet get its plugins before gpud loads the client library (gpud's start
        budget is spent on kubelet); bounded, so a plugin that never settles holds nothing."""
        deadline = time.monotonic() + REGISTRATION_WAIT_S
        while registration_pending(self.link.latest()) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        self._waited = True

    def _wanted(self, state: NodeState) -> tuple[dict[str, str], tuple[str, ...]]:
        # Imported here: a node without credentials never loads the label code for this link.
        from gpud.labels.facts import read_machine_type, read_pci_classes
        from gpud.labels.snapshot import snapshot_labels

        bus_ids = tuple(sorted(g.pci_bus_id for g in state.gpus))
        if self._facts is None or self._facts[0] != bus_ids:
            self._facts = (bus_ids, read_machine_type(), read_pci_classes(bus_ids))
        _, machine, classes = self._facts
        labels = snapshot_labels(state, machine, classes)
        allowed, dropped = kubelet_allowed(labels.labels)
        return allowed, dropped

    def _kube(self) -> KubeClient:
        from gpud.kube.client import KubeClient

        if self._client is None:
            self._client = KubeClient(self._access)
        return self._client

    async def _follow_mig_label(self, state: NodeState) -> None:
        """Watch the Node's nvidia.com/mig.config while ``mig.byLabel`` is on and this node can
        do MIG (:mod:`gpud.kube.miglabel`)."""
        wanted = state.config.mig.by_label.enabled and state.mig_status is not None
        if wanted and self._mig is None:
            from gpud.kube.miglabel import MigByLabel

            self._mig = MigByLabel(
                self._kube(),
                self.link.requests,
                lambda: float(self.link.latest().config.mig.by_label.wait_for_pods),
                self._node_seen,
                lambda _: self._show(),
                lambda: self.link.latest().backend_error,
            )
            self._mig.start()
        elif not wanted and self._mig is not None:
            await self._mig.stop()
            self._mig = None
            self._show()
        if self._mig is not None:
            self._mig.poke()

    def _node_seen(self, uid: str) -> None:
        """The watch read the Node: one re-created under the same name gets gpud's labels again
        even when nothing on the node changed."""
        if self._uid and uid != self._uid:
            log.warning("Node %s was re-created: applying all again", self._access.node_name)
            self._forget_node()
            self.link.republish()

    def _forget_node(self) -> None:
        """The Node is gone (or another one): what was applied to it must be applied again."""
        self._uid, self._applied, self._condition = "", None, None

    async def _on_node(self, action: Callable[[str], Awaitable[None]]) -> None:
        """Run ``action`` with the Node's UID; a Node deleted (and registered again) meanwhile
        is looked up again and everything gpud keeps on it is applied again."""
        for _ in range(2):
            uid = await self._node_uid()
            try:
                await action(uid)
            except NodeReplaced:
                log.warning("Node %s was deleted; looking it up again", self._access.node_name)
                self._forget_node()
                continue
            return
        raise KubeError(f"Node {self._access.node_name} keeps being replaced; retrying")

    async def _node_uid(self) -> str:
        """The Node's UID, looked up (with the condition gpud may have left on it before a
        restart) when not known."""
        if not self._uid:
            uid, status, since = await self._kube().node_condition(CONDITION_TYPE)
            self._forget_node()
            self._uid, self._found_condition = uid, (status, since)
        return self._uid

    async def _keep_labels(self, wanted: dict[str, str]) -> None:
        if wanted != self._applied:
            await self._apply(wanted)

    async def _apply(self, wanted: dict[str, str]) -> None:
        async def apply(uid: str) -> None:
            await self._kube().apply_node_labels(uid, wanted)

        await self._on_node(apply)
        self._applied = wanted
        log.info("applied %d labels to Node %s", len(wanted), self._access.node_name)
        self._show()

    # ---- Events ----------------------------------------------------------------------------

    def _take(self, update: Update) -> None:
        """Turn the update's node events (those not taken before) into Events in the outbox,
        past the rate limit."""
        if self._outbox is None:
            return
        fresh = []
        for event in update.events:
            if self._taken.get(id(event)) is event:
                continue
            self._taken[id(event)] = event
            fresh.append(event)
        while len(self._taken) > 2 * MAX_EVENTS:
            self._taken.popitem(last=False)
        if update.dropped:
            log.warning("%d node events were dropped before the API link took them", update.dropped)
            self._events_lost += update.dropped
        found, self._driver_lost = reports(fresh, self._driver_lost)
        now = time.monotonic()
        for report in found:
            passed = self._limiter.offer(report.key, report, now)
            if passed is not None:
                self._queue(passed, now)
            elif self._limiter.holding(report.key) == 1:
                log.warning(
                    "Event rate limit: holding back %s Events about %s; they are counted and "
                    "the next one sent says how many",
                    report.reason,
                    report.subject,
                )
        for passed in self._limiter.release(now):
            self._queue(passed, now)
        self._limiter.forget_idle(now)

    def _queue(self, passed: Passed[Report], now: float) -> None:
        assert self._outbox is not None
        first_at = 0.0
        if passed.held_back:
            first_at = time.time() - (now - passed.since)
            log.info(
                "Event rate limit: sending %s about %s for %d held back",
                passed.item.reason,
                passed.item.subject,
                passed.held_back,
            )
        if not self._outbox.add(passed.item, passed.held_back, first_at):
            self._events_lost += 1
            log.warning("Event outbox full: the oldest Event was dropped unsent")

    async def _send_events(self) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        while (outgoing := outbox.first()) is not None:
            body = event_body(outgoing, self._access.node_name, await self._node_uid())
            if not await self._kube().create_event(body):
                log.info("Event %s had been created already; not sent again", outgoing.name)
            outbox.done()
            self._events_sent += 1

    # ---- the condition -----------------------------------------------------------------------

    async def _keep_condition(self, state: NodeState) -> None:
        if not state.ready:
            return  # the GPUs and their layouts may be partial before that
        wanted = gpu_condition(state)
        sent = self._condition
        now = time.monotonic()
        if sent is not None and sent.condition == wanted and now - sent.at < HEARTBEAT_S:
            return

        async def apply(uid: str) -> None:
            before = self._condition
            status, since = (
                (before.condition.status, before.since) if before else self._found_condition
            )
            stamp = _now_stamp()
            if status != wanted.status or not since:
                since = stamp
            body = {
                "type": CONDITION_TYPE,
                "status": wanted.status,
                "reason": wanted.reason,
                "message": wanted.message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": since,
            }
            await self._kube().apply_node_condition(uid, body)
            self._condition = _SentCondition(wanted, since, time.monotonic())

        await self._on_node(apply)
        if sent is None or sent.condition.status != wanted.status:
            log.info(
                "Node %s condition %s=%s (%s): %s",
                self._access.node_name,
                CONDITION_TYPE,
                wanted.status,
                wanted.reason,
                wanted.message,
            )

    def _arm_wake(self) -> None:
        """Be handed the snapshot again when held-back Events may go or the heartbeat is due."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        delays = []
        held = self._limiter.next_release_s(time.monotonic())
        if held is not None:
            delays.append(held + 0.01)
        if self._condition is not None:
            delays.append(max(0.0, self._condition.at + HEARTBEAT_S - time.monotonic()))
        if delays:
            loop = asyncio.get_running_loop()
            self._wake = loop.call_later(min(delays), self.link.republish)

    # ---- DRA ResourceSlices --------------------------------------------------------------

    async def _keep_slices(self, state: NodeState) -> None:
        """Publish the node's devices as ResourceSlices while ``allocation.mode`` is dra
        (:mod:`gpud.dra.publish`); delete them when it no longer is, or for a driver name no
        longer used, before anything else: one API per node for the same GPUs."""
        if not state.ready:
            return  # the GPUs and their layouts may be partial before that
        from gpud.dra.publish import SliceSync

        driver = state.config.dra.driver_name
        wanted = state.config.allocation.mode is AllocationMode.DRA
        if self._unpublish is None:
            self._unpublish = set() if wanted else {driver}
        sync = self._slices
        if sync is not None and (not wanted or sync.driver != driver):
            await sync.stop()
            self._slices = None
            self._unpublish.add(sync.driver)
            log.info(
                "DRA: withdrawing the ResourceSlices of %s (%s)",
                self._access.node_name,
                sync.driver,
            )
        for old in sorted(self._unpublish - ({driver} if wanted else set())):
            await SliceSync(self._kube(), old, lambda: None, self.sys_root).withdraw()
            self._unpublish.discard(old)
        if not wanted:
            return
        if self._slices is None:
            self._slices = SliceSync(self._kube(), driver, self._slices_changed, self.sys_root)
            self._slices.start()
        await self._slices.keep(state)
        self._show()

    def _slices_changed(self) -> None:
        self._show()
        self.link.republish()

    def _show(self) -> None:
        parts = [self._access.describe()]
        if self._access.on and self._applied is not None:
            parts.append(f"{len(self._applied)} labels applied")
        if self._access.on and self._condition is not None:
            parts.append(f"{CONDITION_TYPE}={self._condition.condition.status}")
        if self._access.on:
            events = f"Events: {self._events_sent} sent"
            if self._limiter.held_back_total:
                events += f", {self._limiter.held_back_total} held back by the rate limit"
            if self._outbox is not None and len(self._outbox):
                events += f", {len(self._outbox)} waiting"
            if self._events_lost:
                events += f", {self._events_lost} dropped unsent"
            parts.append(events)
        if self._warnings:
            left_out = ", ".join(w.split()[1] for w in self._warnings)
            parts.append(f"not sent (NodeRestriction): {left_out}")
        if self._mig is not None:
            parts.append(self._mig.progress.describe())
        if self._slices is not None:
            parts.append(self._slices.published.describe(self._slices.driver))
            if self._slices.problem:
                parts.append(self._slices.problem)
        self.link.set_detail("; ".join(parts))


def _now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
