"""The publishers' hub on its own: bounds, start failures, and who waits for whom.

The hub is the daemon's own (a Daemon on a simulated T4, not started); snapshots are the
daemon's first one with a new generation, so every value a publisher sees is a real NodeState.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from gpud.daemon.daemon import Daemon
from gpud.daemon.settings import Overrides, resolve
from gpud.hw.sim.backend import SimBackend
from gpud.node.events import ConfigReloaded
from gpud.node.hub import MAX_EVENTS, Backoff, PublisherLink, Publishers, Update
from gpud.node.state import NodeState


def daemon(root: Path) -> Daemon:
    settings = resolve(
        None,
        Overrides(
            simulate="t4x1",
            kubelet_dir=root / "kubelet",
            state_dir=root / "state",
            socket=root / "gpud.sock",
        ),
    )
    return Daemon(settings, SimBackend("t4x1", root / "state"))


def snapshot(hub: Publishers, generation: int) -> NodeState:
    return dataclasses.replace(hub.latest(), generation=generation)


class Gate:
    """Records what it is handed; holds in ``publish`` while ``open`` is clear, fails while
    ``error`` is set."""

    def __init__(self, name: str, *, start_error: str = "") -> None:
        self.name = name
        self.start_error = start_error
        self.open = asyncio.Event()
        self.open.set()
        self.entered = asyncio.Event()
        self.error = ""
        self.updates: list[Update] = []
        self.stopped = False
        self.link: PublisherLink | None = None

    async def start(self, link: PublisherLink) -> None:
        if self.start_error:
            raise RuntimeError(self.start_error)
        self.link = link

    async def publish(self, update: Update) -> None:
        self.entered.set()
        await self.open.wait()
        if self.error:
            raise RuntimeError(self.error)
        self.updates.append(update)

    async def stop(self) -> None:
        self.stopped = True


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_publisher_that_falls_behind_gets_the_newest_state_and_events_and_a_count_of_the_rest(
    tmp_path: Path,
) -> None:
    hub = daemon(tmp_path).publishers
    slow = Gate("slow")
    hub.add(slow)

    async def scenario() -> None:
        await hub.start()
        await settle()
        slow.open.clear()
        slow.entered.clear()
        hub.publish(snapshot(hub, 2))
        await asyncio.wait_for(slow.entered.wait(), 5)
        total = MAX_EVENTS + 500
        for n in range(total):
            hub.publish(snapshot(hub, 3 + n), [ConfigReloaded(float(n), "gpud.yaml")])
        slow.open.set()
        await settle()
        assert [u.state.generation for u in slow.updates[1:]] == [2, total + 2]
        caught_up = slow.updates[-1]
        assert len(caught_up.events) == MAX_EVENTS and caught_up.dropped == 500
        assert [e.at for e in caught_up.events] == [float(n) for n in range(500, total)]
        await hub.stop()

    asyncio.run(scenario())


def test_a_required_publisher_that_cannot_start_stops_the_start_and_what_had_started(
    tmp_path: Path,
) -> None:
    hub = daemon(tmp_path).publishers
    first, second = Gate("first"), Gate("api", start_error="socket in use")
    hub.add(first, required=True)
    hub.add(second, required=True)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="socket in use"):
            await hub.start()
        assert first.stopped and not second.stopped

    asyncio.run(scenario())


def test_the_daemon_waits_for_the_kubelet_link_but_never_for_one_that_fails(
    tmp_path: Path,
) -> None:
    hub = daemon(tmp_path).publishers
    link = Gate("kubelet")
    hub.add(link, awaited=True, backoff=Backoff(first=60.0, cap=60.0))
    other = Gate("other")
    hub.add(other)

    async def scenario() -> None:
        await hub.start()
        await settle()
        # Another publisher holding on is nobody's business.
        other.open.clear()
        link.open.clear()
        hub.publish(snapshot(hub, 2))
        delivered = asyncio.create_task(hub.delivered())
        await settle()
        assert not delivered.done()  # the kubelet link has not taken it yet
        link.open.set()
        await asyncio.wait_for(delivered, 1)
        assert link.updates[-1].state.generation == 2

        # A kubelet link that fails is retried behind the daemon (here in a minute), not waited
        # for: every pass meanwhile goes through at once.
        link.error = "kubelet.sock refused"
        hub.publish(snapshot(hub, 3))
        await asyncio.wait_for(hub.delivered(), 1)
        status = {s.name: s for s in hub.statuses()}["kubelet"]
        assert (status.state, status.error, status.failures) == ("degraded", link.error, 1)
        assert status.retry_at is not None
        hub.publish(snapshot(hub, 4))
        await asyncio.wait_for(hub.delivered(), 1)
        other.open.set()
        await hub.stop()
        assert {s.state for s in hub.statuses()} == {"stopped"}

    asyncio.run(scenario())


def test_a_problem_a_publisher_reports_shows_until_it_says_it_recovered(tmp_path: Path) -> None:
    hub = daemon(tmp_path).publishers
    metrics = Gate("metrics")
    hub.add(metrics)

    async def scenario() -> None:
        await hub.start()
        await settle()
        assert metrics.link is not None
        metrics.link.set_detail("serving /metrics on :9400")
        metrics.link.degraded("pod resources unreachable: connection refused")
        hub.publish(snapshot(hub, 2))
        await settle()
        status = hub.statuses()[0]
        assert (status.state, status.error, status.detail) == (
            "degraded",
            "pod resources unreachable: connection refused",
            "serving /metrics on :9400",
        )
        metrics.link.recovered()
        assert (hub.statuses()[0].state, hub.statuses()[0].error) == ("ok", "")
        await hub.stop()

    asyncio.run(scenario())
