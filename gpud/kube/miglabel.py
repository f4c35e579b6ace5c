"""MIG layouts chosen by the Node label ``nvidia.com/mig.config``, as mig-manager's protocol has
it, from the node itself.

Two tasks share the API link's client. The *watcher* reads gpud's own Node, then watches it
(the field-selector watch a kubelet credential may open); when the watch breaks it waits with
backoff and reads the Node again, so a change made while it was away is still seen, once. The
*worker* takes the newest label value and drives it: ``nvidia.com/mig.config.state`` goes
``pending``, the layout is applied through the daemon's request door exactly as ``gpudctl mig
apply -c NAME`` would (same planner, journal and PodResources checks), then ``success`` or
``failed``. Where mig-manager gets stuck or guesses, this does not:

- pods holding devices the layout destroys are waited for (``mig.byLabel.waitForPods``), then
  the state is ``failed`` naming them, never left ``pending``;
- a value is driven once: a re-read Node with the value already handled changes nothing, and a
  state label that cannot be written (the API server away) is written when it is back, without
  applying again;
- a new value while one waits for pods replaces it at once;
- a node whose GPU driver is not usable yet (first boot, the driver still installing) leaves the
  state label alone and drives the value once the driver is there, instead of ``failed``.

The daemon is told the label's value (``NodeRequests.mig_label``), which makes it refuse a local
``gpudctl mig apply`` while the label is set: the cluster's choice wins (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gpud.kube.client import KubeClient, KubeError, NodeReplaced, NodeView
from gpud.node.hub import Backoff
from gpud.node.requests import ORIGIN_LABEL, MigRequest, NodeRequests, Outcome, Unavailable

log = logging.getLogger(__name__)

CONFIG_LABEL = "nvidia.com/mig.config"
STATE_LABEL = "nvidia.com/mig.config.state"
PENDING = "pending"
SUCCESS = "success"
FAILED = "failed"

BACKOFF = Backoff(first=1.0, cap=30.0)


def wanted_layout(labels: dict[str, str] | None) -> str | None:
    """The layout a Node's labels ask for; None for no label (or an empty one), which asks for
    nothing: the layout stays as it is, chosen locally from then on."""
    if labels is None:
        return None
    return labels.get(CONFIG_LABEL) or None


def final_state(outcome: Outcome) -> str:
    return SUCCESS if outcome.result in ("applied", "unchanged") else FAILED


@dataclass(frozen=True)
class Progress:
    """What ``gpudctl status`` says about the label: the value, its state, and the last
    problem talking to the API server ("" when none)."""

    layout: str | None = None
    state: str = ""
    problem: str = ""

    def describe(self) -> str:
        if self.layout is None:
            text = f"no {CONFIG_LABEL} on the Node"
        else:
            text = f"{CONFIG_LABEL}={self.layout} {self.state or 'seen'}"
        return text + (f" ({self.problem})" if self.problem else "")


class MigByLabel:
    """The watcher and the worker for one Node identity; :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        client: KubeClient,
        requests: NodeRequests,
        wait_for_pods_s: Callable[[], float],
        node_seen: Callable[[str], None],
        changed: Callable[[Progress], None],
        unusable: Callable[[], str],
    ) -> None:
        self.client = client
        self.requests = requests
        self.wait_for_pods_s = wait_for_pods_s
        # Told the Node's UID whenever it is read (a Node re-created under the same name has a
        # new one: the labels and the condition must be sent to it again).
        self.node_seen = node_seen
        self.changed = changed
        # Why the daemon cannot do MIG now ("" when it can): the GPU driver not there yet.
        self.unusable = unusable
        self._blocked = False
        self.progress = Progress()
        self._node: NodeView | None = None
        self._wake = asyncio.Event()
        # The value last driven to success or failed (its state label written).
        self._done: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(), name="mig-by-label watcher"),
            loop.create_task(self._work(), name="mig-by-label worker"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Neither task ends but by being stopped: a bug would otherwise stop the label being
        followed without a word."""
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped", task.get_name(), exc_info=task.exception())
            self._report(problem=f"{task.get_name()} stopped: {task.exception()!r}; see the log")

    def poke(self) -> None:
        """The node state changed: a value held back for want of a driver may go now."""
        if self._blocked and not self.unusable():
            self._blocked = False
            self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.requests.mig_label(None)

    # ---- the watcher ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        failures = 0
        while True:
            try:
                first = await self.client.read_node()
                self._seen(first)
                failures = 0
                async for kind, node in self.client.watch_node(first.resource_version):
                    if kind == "DELETED":
                        log.warning("Node %s was deleted", self.client.access.node_name)
                        break
                    self._seen(node)
            except KubeError as exc:
                failures += 1
                delay = BACKOFF.delay(failures)
                self._report(problem=f"watching the Node: {exc}; again in {delay:.0f} s")
                log.warning("watching Node %s: %s", self.client.access.node_name, exc)
                await asyncio.sleep(delay)
                continue
            # A deleted Node (or a watch the server ended): read it again after a pause.
            await asyncio.sleep(BACKOFF.first)

    def _seen(self, node: NodeView) -> None:
        before = self._node
        self._node = node
        if before is None or before.uid != node.uid:
            # A re-created Node's label is a new request, even with the value the old one had.
            self._done = None
            self.node_seen(node.uid)
            self._wake.set()
        if self.progress.problem.startswith("watching"):
            self._report(problem="")
        if wanted_layout(dict(before.labels if before else {})) != wanted_layout(dict(node.labels)):
            self._wake.set()

    # ---- the worker ----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            node = self._node
            if node is None:  # a re-created Node: the watcher reads it and wakes this again
                continue
            layout = wanted_layout(dict(node.labels))
            self.requests.mig_label(layout)
            if layout is None:
                self._done = None
                self._report(layout=None, state="")
                continue
            if layout == self._done:
                continue
            why = self.unusable()
            if why:
                self._blocked = True
                self._report(layout=layout, state="", problem=f"waiting for the GPUs: {why}")
                log.info("%s=%s waits for the GPUs: %s", CONFIG_LABEL, layout, why)
                continue
            await self._drive(layout)

    async def _drive(self, layout: str) -> None:
        """Bring the GPUs to ``layout`` and say so in the state label; returns early (leaving
        the rest to the next round) when the label changes meanwhile."""
        self._done = None  # whatever was done before, the state label is about to change
        request = MigRequest(layout, origin=ORIGIN_LABEL)
        if await self._holds(request):
            # Applied anyway (it changes nothing): the daemon records that the label chose it.
            outcome = await self._apply(request)
            await self._finish(layout, final_state(outcome), _why(outcome))
            return
        if not await self._set_state(layout, PENDING):
            return
        wait = self.wait_for_pods_s()
        apply = asyncio.ensure_future(
            self._apply(MigRequest(layout, origin=ORIGIN_LABEL, wait_for_pods_s=wait))
        )
        superseded = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({apply, superseded}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            superseded.cancel()
        if not apply.done():
            # Cancels a wait for pods; an apply already making its steps goes on (the daemon
            # shields it) and the next layout queues behind it.
            apply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await apply
            log.info("%s changed while %s was pending: taking the new value", CONFIG_LABEL, layout)
            return
        outcome = await apply
        await self._finish(layout, final_state(outcome), _why(outcome))

    async def _apply(self, request: MigRequest) -> Outcome:
        try:
            return await self.requests.apply_mig(request)
        except Unavailable as exc:
            return Outcome("failed", message=f"MIG unavailable: {exc}", error_kind="error")

    async def _holds(self, request: MigRequest) -> bool:
        """Whether the GPUs already hold the layout (mig-manager's first assert): then the state
        is success at once, without a pending flicker on every restart of gpud."""
        try:
            return not await self.requests.assert_mig(request)
        except Exception as exc:  # a bad layout, no MIG: the apply says why, with its Event
            log.debug("assert of %s before applying: %s", request.config_name, exc)
            return False

    async def _finish(self, layout: str, state: str, why: str = "") -> None:
        if state == FAILED:
            log.error("%s=%s failed: %s", CONFIG_LABEL, layout, why)
        if await self._set_state(layout, state, why):
            self._done = layout

    async def _set_state(self, layout: str, state: str, why: str = "") -> bool:
        """Write the state label, retrying with backoff until it lands; False when the wanted
        layout changed meanwhile (the new value's round writes its own state)."""
        failures = 0
        while True:
            node = self._node
            if node is None or wanted_layout(dict(node.labels)) != layout:
                return False
            self._report(layout=layout, state=state, problem=" ".join(why.split()))
            if node.labels.get(STATE_LABEL) == state:
                return True
            try:
                await self.client.set_node_label(node.uid, STATE_LABEL, state)
                log.info("%s=%s: %s=%s", CONFIG_LABEL, layout, STATE_LABEL, state)
                return True
            except NodeReplaced:
                # The Node was re-created: its labels (and so the wanted layout) are read anew.
                self._node = None
                return False
            except KubeError as exc:
                failures += 1
                delay = BACKOFF.delay(failures)
                self._report(
                    problem=f"setting {STATE_LABEL}={state}: {exc}; again in {delay:.0f} s"
                )
                log.warning("cannot set %s=%s: %s", STATE_LABEL, state, exc)
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    continue
                # The watcher read the Node again; the loop looks at what it says.

    def _report(self, **changes: str | None) -> None:
        self.progress = dataclasses.replace(self.progress, **changes)  # type: ignore[arg-type]
        self.changed(self.progress)


def _why(outcome: Outcome) -> str:
    return outcome.message if final_state(outcome) == FAILED else ""
