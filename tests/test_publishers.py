"""Publishers fail alone: a broken or stuck audience of the node state never touches kubelet.

Through the running agent (``compose`` on a simulated dgx-a100, the fake kubelet over real gRPC,
the real ``gpudctl``), with one extra publisher that misbehaves the way a real one will (an NFD
directory that is missing, an API server that hangs).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpud.node.events import HealthChanged, XidSeen
from gpud.node.hub import Backoff, PublisherLink, Update
from tests.support.agent import Agent, eventually
from tests.support.kubelet import HEALTHY, UNHEALTHY

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"
FAST = Backoff(first=0.05, cap=0.2)


class Broken:
    """Fails every publish while ``failing`` says why; keeps the updates that got through."""

    name = "broken"

    def __init__(self) -> None:
        self.failing: str | None = "/etc/kubernetes/node-feature-discovery/features.d is missing"
        self.delivered: list[Update] = []
        self.tries = 0

    async def start(self, link: PublisherLink) -> None:
        return None

    async def publish(self, update: Update) -> None:
        self.tries += 1
        if self.failing:
            raise OSError(self.failing)
        self.delivered.append(update)

    async def stop(self) -> None:
        return None


class Stuck:
    """Hangs on the first update with an XID until released, like a call to an API server that
    hangs."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.hanging = asyncio.Event()
        self.delivered: list[Update] = []

    async def start(self, link: PublisherLink) -> None:
        return None

    async def publish(self, update: Update) -> None:
        self.delivered.append(update)
        if not self.hanging.is_set() and any(isinstance(e, XidSeen) for e in update.events):
            self.hanging.set()
            await self.release.wait()

    async def stop(self) -> None:
        return None


def publisher(status: dict, name: str) -> dict:
    return next(p for p in status["publishers"] if p["name"] == name)


def test_a_failing_publisher_degrades_alone_shows_in_status_and_loses_no_event(
    short_tmp: Path,
) -> None:
    agent = Agent(short_tmp)
    broken = Broken()
    agent.daemon.publishers.add(broken, backoff=FAST)

    async def scenario() -> None:
        await agent.wait_devices(GPU, lambda d: len(d) == 8)
        await eventually(lambda: broken.tries >= 3)  # retried with backoff, not once
        status = await agent.status()
        names = [p["name"] for p in status["publishers"]]
        assert names == ["control-api", "kubelet", "labels", "metrics", "kubernetes", "broken"]
        assert publisher(status, "control-api")["state"] == "ok"
        assert publisher(status, "kubelet")["state"] == "ok"
        failed = publisher(status, "broken")
        assert failed["state"] == "degraded"
        assert failed["error"] == broken.failing
        assert failed["failures"] >= 1 and failed["since"] and failed["next_retry"]
        assert all(p["registered"] for p in status["plugins"])
        table = (await agent.gpudctl("status")).stdout
        assert "broken" in table and "degraded (" in table and broken.failing in table

        # kubelet's path is untouched: an XID reaches it, Allocate answers.
        out = await agent.gpudctl("debug", "inject-xid", "--gpu", "3", "--xid", "79")
        assert out.returncode == 0, out.stderr
        uuid3 = status["gpus"][3]["uuid"]
        await agent.wait_devices(GPU, lambda d: d[uuid3].health == UNHEALTHY)
        uuid5 = status["gpus"][5]["uuid"]
        got = await asyncio.to_thread(agent.kubelet.allocate, GPU, [uuid5])
        assert got.envs["NVIDIA_VISIBLE_DEVICES"] == uuid5

        # Repaired, it catches up: the latest snapshot and every event it failed to take.
        broken.failing = None
        await eventually(lambda: bool(broken.delivered))
        status = await agent.status()
        fixed = publisher(status, "broken")
        assert (fixed["state"], fixed["error"], fixed["next_retry"]) == ("ok", "", None)
        state = broken.delivered[-1].state
        assert not state.device(uuid3).healthy and state.device(uuid3).reason == "critical XID 79"
        events = [e for u in broken.delivered for e in u.events]
        assert [(e.gpu_index, e.xid) for e in events if isinstance(e, XidSeen)] == [(3, 79)]
        assert [e.uuid for e in events if isinstance(e, HealthChanged)] == [uuid3]

    agent.run(scenario)


def test_a_stuck_publisher_holds_nobody_up_and_is_handed_only_the_latest_snapshot(
    short_tmp: Path,
) -> None:
    agent = Agent(short_tmp)
    stuck = Stuck()
    agent.daemon.publishers.add(stuck)

    async def scenario() -> None:
        await agent.wait_devices(GPU, lambda d: len(d) == 8)
        status = await agent.status()
        uuids = [g["uuid"] for g in status["gpus"]]
        # An application XID: something for it to hang on, that changes no health.
        out = await agent.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "43")
        assert out.returncode == 0, out.stderr
        await asyncio.wait_for(stuck.hanging.wait(), 20)
        hung = len(stuck.delivered)
        hung_at = stuck.delivered[-1].state.generation

        for index in (1, 2, 4):
            out = await agent.gpudctl("debug", "inject-xid", "--gpu", str(index), "--xid", "48")
            assert out.returncode == 0, out.stderr
            await agent.wait_devices(GPU, lambda d, i=index: d[uuids[i]].health == UNHEALTHY)
            out = await agent.gpudctl("device", "set-healthy", uuids[index])
            assert out.returncode == 0, out.stderr
            await agent.wait_devices(GPU, lambda d, i=index: d[uuids[i]].health == HEALTHY)
        assert publisher(await agent.status(), "stuck")["state"] == "ok"  # slow is not failed
        latest = agent.daemon.publishers.latest().generation
        assert latest >= hung_at + 6

        stuck.release.set()
        await eventually(lambda: stuck.delivered[-1].state.generation == latest)
        after = stuck.delivered[hung:]
        assert len(after) == 1, [u.state.generation for u in after]  # not one per snapshot
        xids = [(e.gpu_index, e.xid) for e in after[0].events if isinstance(e, XidSeen)]
        assert xids == [(1, 48), (2, 48), (4, 48)]
        back = [(e.gpu_index, e.healthy) for e in after[0].events if isinstance(e, HealthChanged)]
        assert back == [(1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]

    agent.run(scenario)


class FailsToStart:
    name = "nfd"

    def __init__(self) -> None:
        self.starts = 0
        self.delivered: list[Update] = []

    async def start(self, link: PublisherLink) -> None:
        self.starts += 1
        if self.starts < 3:
            raise FileNotFoundError(2, "No such file or directory", "/etc/kubernetes/features.d")

    async def publish(self, update: Update) -> None:
        self.delivered.append(update)

    async def stop(self) -> None:
        return None


def test_a_publisher_that_cannot_start_is_retried_and_gpud_starts_without_it(
    short_tmp: Path,
) -> None:
    agent = Agent(short_tmp)
    nfd = FailsToStart()
    agent.daemon.publishers.add(nfd, backoff=Backoff(first=1.0, cap=1.0))

    async def scenario() -> None:
        await agent.wait_devices(GPU, lambda d: len(d) == 8)
        status = await agent.status()
        down = publisher(status, "nfd")
        assert down["state"] == "degraded"
        assert down["error"].startswith("cannot start: ") and "features.d" in down["error"]
        await eventually(lambda: bool(nfd.delivered))
        assert nfd.starts == 3
        assert nfd.delivered[-1].state.resources  # the snapshot it missed meanwhile
        assert publisher(await agent.status(), "nfd")["state"] == "ok"

    agent.run(scenario)
