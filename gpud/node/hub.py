"""Publishers: the audiences of the node state, each in its own task, each failing alone.

A publisher implements :class:`Publisher` and is added to the daemon's :class:`Publishers` hub.
The hub starts it, then hands it every change as an :class:`Update`: the latest snapshot and the
events since its last update. A publisher that is slow never holds the daemon up or makes
memory grow: it gets the newest snapshot when it is ready (those in between are skipped, as a
scrape or a label file only ever needs the latest truth) and at most :data:`MAX_EVENTS` events
(the oldest are dropped and counted). One that raises is marked degraded with the error and the
time, the same update is tried again after a backoff (events included, so none is lost to a
short outage), and its state shows in ``gpudctl status``; the others, kubelet's link among them,
go on as if nothing happened.

Only the kubelet link is ``awaited``: the daemon's reconcile pass waits until it has taken each
snapshot, because a MIG apply must know kubelet was told the devices are withdrawn before it
destroys them. Every other publisher runs behind the daemon, never in step with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpud.node.events import NodeEvent
from gpud.node.requests import NodeRequests
from gpud.node.state import NodeState
from gpud.node.stats import NodeStats

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
# A publisher's start or stop must not hold gpud's own start or stop for longer than this.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

STARTING = "starting"
OK = "ok"
DEGRADED = "degraded"
STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Update:
    """What a publisher is handed: the latest snapshot, the events since its last update (oldest
    first), and how many events were dropped because it fell :data:`MAX_EVENTS` behind."""

    state: NodeState
    events: tuple[NodeEvent, ...] = ()
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries of a failing publisher: ``first``, doubling up to ``cap``."""

    first: float = 1.0
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.first * 2 ** max(0, failures - 1))


@dataclass(frozen=True, slots=True)
class PublisherStatus:
    """A publisher's state for ``gpudctl status``: starting, ok, degraded or stopped, since when
    (wall clock), and while degraded the error, how many tries failed in a row and when the next
    one is due (None when none is scheduled). ``detail`` is what the publisher says about itself
    ("serving /metrics on :9400")."""

    name: str
    state: str
    since: float
    error: str = ""
    failures: int = 0
    retry_at: float | None = None
    detail: str = ""


class Publisher(Protocol):
    """An audience of the node state. ``name`` is unique and short ("kubelet", "metrics").

    ``start`` acquires what the publisher needs (binds its port, arms its watch); it should be
    quick. ``publish`` makes the audience match an update; it is never called concurrently with
    itself or before ``start`` succeeded. ``stop`` releases everything; it is called once, at
    gpud's stop, if ``start`` succeeded. An exception from ``start`` or ``publish`` degrades the
    publisher and is retried with backoff (``start`` first if that was what failed).
    """

    name: str

    async def start(self, link: PublisherLink) -> None: ...

    async def publish(self, update: Update) -> None: ...

    async def stop(self) -> None: ...


class PublisherLink:
    """What a publisher gets from the node: the latest snapshot, the counters, the request door
    and a way to report a problem it found outside ``publish`` (a scrape that could not reach
    PodResources) so that it shows in ``gpudctl status`` as well."""

    def __init__(self, hub: Publishers, entry: _Entry) -> None:
        self._hub = hub
        self._entry = entry

    @property
    def name(self) -> str:
        return self._entry.publisher.name

    @property
    def stats(self) -> NodeStats:
        return self._hub.stats

    @property
    def requests(self) -> NodeRequests:
        return self._hub.requests

    def latest(self) -> NodeState:
        """The newest snapshot, whatever this publisher has been handed so far."""
        return self._hub.latest()

    def publishers(self) -> tuple[PublisherStatus, ...]:
        """Every publisher's state, this one's included (for status reports)."""
        return self._hub.statuses()

    def degraded(self, problem: str) -> None:
        """Report a problem; the publisher shows degraded until :meth:`recovered`."""
        if problem != self._entry.problem:
            log.warning("publisher %s degraded: %s", self.name, problem)
        self._entry.problem = problem
        self._hub._refresh(self._entry)

    def recovered(self) -> None:
        if self._entry.problem:
            log.info("publisher %s recovered from: %s", self.name, self._entry.problem)
        self._entry.problem = ""
        self._hub._refresh(self._entry)

    def republish(self) -> None:
        """Ask to be handed the latest snapshot again (a publisher that looks for something
        outside the node state, such as credentials that appear later)."""
        self._entry.wake.set()

    def set_detail(self, detail: str) -> None:
        self._entry.detail = detail
        self._hub._refresh(self._entry)


class _Entry:
    def __init__(
        self,
        hub: Publishers,
        publisher: Publisher,
        required: bool,
        awaited: bool,
        backoff: Backoff,
    ) -> None:
        self.publisher = publisher
        self.required = required
        self.awaited = awaited
        self.backoff = backoff
        self.started = False
        self.events: deque[NodeEvent] = deque()
        self.dropped = 0
        self.wake = asyncio.Event()
        # The newest generation this publisher was handed (successfully or not).
        self.handled = 0
        self.task: asyncio.Task[None] | None = None
        # A failure of start/publish, and a problem the publisher reported itself.
        self.failure = ""
        self.problem = ""
        self.failures = 0
        self.retry_at: float | None = None
        self.detail = ""
        self.status = PublisherStatus(publisher.name, STARTING, time.time())
        self.link = PublisherLink(hub, self)

    def queue(self, events: Sequence[NodeEvent], front: bool = False) -> None:
        """Add events (``front``: ones handed back after a failed publish, older than any
        queued); beyond MAX_EVENTS the oldest go, counted."""
        if front:
            self.events.extendleft(reversed(events))
        else:
            self.events.extend(events)
        while len(self.events) > MAX_EVENTS:
            self.events.popleft()
            self.dropped += 1


class Publishers:
    """The hub: owns the latest snapshot and every publisher's task and state."""

    def __init__(self, initial: NodeState, requests: NodeRequests, stats: NodeStats) -> None:
        self.requests = requests
        self.stats = stats
        self._latest = initial
        self._entries: list[_Entry] = []
        self._progress = asyncio.Condition()
        self._running = False

    def add(
        self,
        publisher: Publisher,
        *,
        required: bool = False,
        awaited: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        """Add a publisher before :meth:`start`. ``required``: a failed start stops gpud's
        start (the control socket taken by another gpud); otherwise it degrades and is retried.
        ``awaited``: the daemon waits for it to take each snapshot (the kubelet link only)."""
        if self._running:
            raise RuntimeError("publishers are added before the daemon starts them")
        if any(e.publisher.name == publisher.name for e in self._entries):
            raise ValueError(f"a publisher named {publisher.name!r} is already added")
        self._entries.append(_Entry(self, publisher, required, awaited, backoff or Backoff()))

    def latest(self) -> NodeState:
        return self._latest

    def statuses(self) -> tuple[PublisherStatus, ...]:
        return tuple(e.status for e in self._entries)

    async def start(self) -> None:
        """Start every publisher in the order added, then their tasks. A required one that
        fails stops those already started and raises; any other that fails (or takes longer
        than START_TIMEOUT_S) is degraded and started again by its task after a backoff."""
        self._running = True
        for entry in self._entries:
            if not entry.required:
                await self._try_start(entry)
                continue
            try:
                await entry.publisher.start(entry.link)
            except BaseException:
                await self.stop()
                raise
            entry.started = True
            self._succeeded(entry)
        loop = asyncio.get_running_loop()
        for entry in self._entries:
            entry.wake.set()
            name = f"publisher {entry.publisher.name}"
            entry.task = loop.create_task(self._run(entry), name=name)

    def publish(self, state: NodeState, events: Sequence[NodeEvent] = ()) -> None:
        """Make ``state`` the latest and wake every publisher; never waits."""
        self._latest = state
        for entry in self._entries:
            if events:
                entry.queue(events)
            entry.wake.set()

    async def delivered(self) -> None:
        """Wait until every awaited publisher has been handed the latest snapshot (whether its
        publish worked or failed: a failing one is retried behind the daemon, not in its way)."""
        target = self._latest.generation
        awaited = [e for e in self._entries if e.awaited and e.task is not None]
        if not awaited:
            return
        async with self._progress:
            await self._progress.wait_for(
                lambda: all(e.handled >= target or e.failure or e.task is None for e in awaited)
            )

    async def stop(self) -> None:
        """Cancel the tasks, then stop the started publishers in reverse order (kubelet's link
        withdraws its sockets before the control API goes)."""
        tasks = [e.task for e in self._entries if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in reversed(self._entries):
            entry.task = None
            if not entry.started:
                continue
            entry.started = False
            try:
                await asyncio.wait_for(entry.publisher.stop(), STOP_TIMEOUT_S)
            except Exception as exc:
                log.warning("publisher %s did not stop cleanly: %s", entry.publisher.name, exc)
            entry.status = PublisherStatus(entry.publisher.name, STOPPED, time.time())
        self._running = False

    # ---- per publisher -----------------------------------------------------------------------

    async def _try_start(self, entry: _Entry) -> bool:
        try:
            await asyncio.wait_for(entry.publisher.start(entry.link), START_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self._failed(entry, f"cannot start: not started within {START_TIMEOUT_S:.0f} s")
            return False
        except Exception as exc:
            self._failed(entry, f"cannot start: {_text(exc)}")
            return False
        entry.started = True
        self._succeeded(entry)
        return True

    async def _run(self, entry: _Entry) -> None:
        while True:
            if entry.retry_at is not None:
                await asyncio.sleep(max(0.0, entry.retry_at - time.time()))
            if not entry.started and not await self._try_start(entry):
                await self._mark_handled(entry, self._latest.generation)
                continue
            await entry.wake.wait()
            entry.wake.clear()
            state = self._latest
            events, dropped = tuple(entry.events), entry.dropped
            entry.events.clear()
            entry.dropped = 0
            try:
                await entry.publisher.publish(Update(state, events, dropped))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                entry.queue(events, front=True)
                entry.dropped += dropped
                entry.wake.set()  # try again (with the newest snapshot) after the backoff
                self._failed(entry, _text(exc), exc)
            else:
                self._succeeded(entry)
            await self._mark_handled(entry, state.generation)

    async def _mark_handled(self, entry: _Entry, generation: int) -> None:
        entry.handled = max(entry.handled, generation)
        if entry.awaited:
            async with self._progress:
                self._progress.notify_all()

    def _failed(self, entry: _Entry, error: str, exc: BaseException | None = None) -> None:
        entry.failures += 1
        delay = entry.backoff.delay(entry.failures)
        entry.retry_at = time.time() + delay
        changed = entry.failure != error
        entry.failure = error
        if changed:
            log.warning(
                "publisher %s degraded: %s; retrying in %.1f s (with backoff)",
                entry.publisher.name,
                error,
                delay,
                exc_info=exc is not None and not isinstance(exc, OSError),
            )
        self._refresh(entry)

    def _succeeded(self, entry: _Entry) -> None:
        if entry.failure:
            log.info(
                "publisher %s works again after %d failed tries",
                entry.publisher.name,
                entry.failures,
            )
        entry.failure, entry.failures, entry.retry_at = "", 0, None
        self._refresh(entry)

    def _refresh(self, entry: _Entry) -> None:
        error = entry.failure or entry.problem
        state = DEGRADED if error else OK if entry.started else STARTING
        was = entry.status
        entry.status = PublisherStatus(
            name=entry.publisher.name,
            state=state,
            since=was.since if was.state == state else time.time(),
            error=error,
            failures=entry.failures,
            retry_at=entry.retry_at,
            detail=entry.detail,
        )


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
