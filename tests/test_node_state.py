"""What a publisher is handed: snapshots that agree with what kubelet and gpudctl see, typed
events for what happened, and gpud's own counters.

Through the running agent on simulated GPUs (tests/support/agent.py), driven the way a node is:
the real ``gpudctl``, a fake kubelet over real gRPC, fault injection in the simulated backend.
A recording publisher stands in for metrics, labels and the Kubernetes API link.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from gpud.node.events import (
    BackendOpened,
    ConfigReloaded,
    HealthChanged,
    MigLayoutApplied,
    MigLayoutRefused,
    PluginRegistered,
    XidSeen,
)
from gpud.node.state import NodeState
from tests.support.agent import Agent, Recorder, eventually
from tests.support.kubelet import HEALTHY, UNHEALTHY

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"
SHARED_1G = "nvidia.com/mig-1g.5gb.shared"
TIME_SLICED_1G = """\
version: v1
sharing:
  timeSlicing:
    renameByDefault: true
    resources:
      - name: nvidia.com/mig-1g.5gb
        replicas: 2
"""


def latest(recorder: Recorder) -> NodeState:
    return recorder.updates[-1].state


def test_the_snapshot_says_what_kubelet_was_offered_and_what_is_behind_every_id(
    short_tmp: Path,
) -> None:
    agent = Agent(short_tmp, "a100-40gb:2", TIME_SLICED_1G)
    recorder = Recorder()
    agent.daemon.publishers.add(recorder)

    async def scenario() -> None:
        await agent.wait_devices(GPU, lambda d: len(d) == 2)
        out = await agent.gpudctl("mig", "apply", "-c", "all-1g.5gb", "-o", "json")
        assert out.returncode == 0, out.stderr
        applied = json.loads(out.stdout)
        await agent.wait_devices(SHARED_1G, lambda d: len(d) == 28)
        await eventually(lambda: bool(recorder.events(MigLayoutApplied)))
        state = latest(recorder)
        gpus = {g.index: g.uuid for g in state.gpus}

        # The layout as the GPUs hold it, with names resolved.
        assert [m.gpu_index for m in state.mig] == [0, 1]
        for layout in state.mig:
            assert [gi.profile for gi in layout.instances] == ["1g.5gb"] * 7
            assert [gi.placement.start for gi in layout.instances] == list(range(7))
        mig_uuids = {
            ci.mig_uuid: layout.gpu_uuid
            for layout in state.mig
            for gi in layout.instances
            for ci in gi.compute_instances
        }
        assert len(mig_uuids) == 14

        # Exactly what kubelet was offered, and what is behind each replica ID.
        offered = set(agent.kubelet.devices(SHARED_1G))
        assert [rs.resource for rs in state.resources] == [SHARED_1G]
        assert {d.id for d in state.resource(SHARED_1G).devices} == offered
        for device_id in offered:
            resource, device = state.advertised(device_id)
            base, _, replica = device_id.partition("::")
            assert resource == SHARED_1G and replica in ("0", "1")
            assert device.visible_uuid == base and device.gpu_uuid == mig_uuids[base]
        shared = state.sharing.of("nvidia.com/mig-1g.5gb")
        assert state.sharing.strategy == "time-slicing"
        assert (shared.advertised_as, shared.replicas, shared.renamed) == (SHARED_1G, 2, True)

        # Every device once, MIG devices numbered as nvidia-smi does, all healthy.
        assert [d.uuid for d in state.devices if not d.is_mig] == [gpus[0], gpus[1]]
        migs = [d for d in state.devices if d.is_mig]
        assert {d.uuid: d.gpu_uuid for d in migs} == mig_uuids
        assert [d.mig_index for d in migs if d.gpu_index == 1] == list(range(7))
        assert {(d.profile, d.memory_mib) for d in migs} == {("1g.5gb", 4864)}
        assert all(d.healthy and not d.withdrawn for d in state.devices)
        assert state.mig_status.selected == "all-1g.5gb"
        assert (state.mig_status.last_apply, state.mig_status.applying) == ("done", False)

        # While it ran, publishers were told which GPUs were withdrawn.
        during = [u.state for u in recorder.updates if u.state.withdrawn]
        assert during and during[0].withdrawn == set(gpus.values())
        assert all(d.withdrawn for d in during[0].devices)
        assert during[0].mig_status.applying

        event = recorder.events(MigLayoutApplied)[0]
        assert (event.layout, event.mutations, event.gpus) == ("all-1g.5gb", 32, (0, 1))
        assert event.mutations == applied["mutations"] and event.duration_s > 0
        counts = agent.daemon.stats.read().mig_applies
        assert counts["applied"].count == 1 and counts["applied"].mutations == 32

        # A layout that does not fit: refused, announced, counted, nothing changed.
        bad = short_tmp / "bad.yaml"
        bad.write_text(
            "version: v1\nmig-configs:\n  too-much:\n    - devices: all\n"
            "      mig-enabled: true\n      mig-devices:\n        3g.20gb: 3\n"
        )
        out = await agent.gpudctl("mig", "apply", "-f", str(bad), "-c", "too-much")
        assert out.returncode == 2
        await eventually(lambda: bool(recorder.events(MigLayoutRefused)))
        refused = recorder.events(MigLayoutRefused)[0]
        assert (refused.layout, refused.kind) == ("too-much", "invalid")
        assert "holds at most 2 GPU instances of 3g.20gb" in refused.message
        assert agent.daemon.stats.read().mig_applies["invalid"].count == 1
        assert latest(recorder).mig == state.mig

    agent.run(scenario)


def test_every_xid_is_recorded_per_device_and_a_scoped_one_goes_to_its_mig_device(
    short_tmp: Path,
) -> None:
    agent = Agent(short_tmp, "a100-40gb:1")
    recorder = Recorder()
    agent.daemon.publishers.add(recorder)

    async def scenario() -> None:
        out = await agent.gpudctl("mig", "apply", "-c", "all-balanced")
        assert out.returncode == 0, out.stderr
        await eventually(lambda: bool(recorder.events(MigLayoutApplied)))
        state = latest(recorder)
        gpu = state.gpus[0].uuid
        target = state.mig[0].instances[1]
        victim = target.compute_instances[0].mig_uuid
        others = [d.uuid for d in state.devices if d.is_mig and d.uuid != victim]

        # An application XID: recorded as the GPU's last, counted, nobody taken out.
        out = await agent.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "43")
        assert out.returncode == 0, out.stderr
        await eventually(lambda: bool(recorder.events(XidSeen)))
        seen = recorder.events(XidSeen)[0]
        assert (seen.xid, seen.devices, seen.critical, seen.gi_id) == (43, (gpu,), False, None)
        state = latest(recorder)
        assert state.device(gpu).last_xid.xid == 43 and state.device(gpu).healthy
        assert not recorder.events(HealthChanged)

        # A fault inside one MIG device: that device alone, its XID on it, not on the GPU.
        scoped = ("--gi", str(target.gi_id))
        out = await agent.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "94", *scoped)
        assert out.returncode == 0, out.stderr
        await eventually(lambda: len(recorder.events(XidSeen)) == 2)
        seen = recorder.events(XidSeen)[1]
        assert (seen.devices, seen.critical, seen.gi_id) == ((victim,), True, target.gi_id)
        state = latest(recorder)
        assert state.device(victim).last_xid.xid == 94 and not state.device(victim).healthy
        assert state.device(gpu).last_xid.xid == 43
        assert all(state.device(u).healthy and state.device(u).last_xid is None for u in others)
        assert [(e.uuid, e.healthy) for e in recorder.events(HealthChanged)] == [(victim, False)]
        resource = f"nvidia.com/mig-{target.profile}"
        assert agent.kubelet.devices(resource)[victim].health == UNHEALTHY

        out = await agent.gpudctl("device", "set-healthy", victim)
        assert out.returncode == 0, out.stderr
        await eventually(lambda: len(recorder.events(HealthChanged)) == 2)
        back = recorder.events(HealthChanged)[1]
        assert (back.uuid, back.healthy, back.previous_reason) == (
            victim,
            True,
            f"critical XID 94 on GPU instance {target.gi_id}",
        )
        assert agent.kubelet.devices(resource)[victim].health == HEALTHY
        assert dict(agent.daemon.stats.read().xids) == {(gpu, 43): 1, (gpu, 94): 1}

    agent.run(scenario)


def test_registrations_allocations_and_reloads_are_announced_and_counted(
    short_tmp: Path,
) -> None:
    agent = Agent(short_tmp)
    recorder = Recorder()
    agent.daemon.publishers.add(recorder)

    async def scenario() -> None:
        await agent.wait_devices(GPU, lambda d: len(d) == 8)
        await eventually(lambda: bool(recorder.events(PluginRegistered)))
        opened = recorder.events(BackendOpened)
        assert [(e.system.backend, e.gpu_count) for e in opened] == [("sim", 8)]
        first = recorder.events(PluginRegistered)
        assert [(e.resource, e.endpoint, e.again) for e in first] == [
            (GPU, "nvidia-gpu.sock", False)
        ]
        plugins = latest(recorder).plugins
        assert [(p.resource, p.registered, p.registering, p.error) for p in plugins] == [
            (GPU, True, False, "")
        ]

        # kubelet restarts: the link re-registers on its own, and says so.
        await asyncio.to_thread(agent.kubelet.restart)
        await asyncio.to_thread(agent.kubelet.wait_registered, GPU, 2)
        await eventually(lambda: len(recorder.events(PluginRegistered)) == 2)
        assert recorder.events(PluginRegistered)[1].again

        uuids = [g.uuid for g in latest(recorder).gpus]
        await agent.wait_devices(GPU, lambda d: len(d) == 8)
        for uuid in uuids[:3]:
            await asyncio.to_thread(agent.kubelet.allocate, GPU, [uuid])
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(agent.kubelet.allocate, GPU, ["GPU-gone"], validate=False)
        counts = agent.daemon.stats.read().resources[GPU]
        assert (counts.registrations, counts.reregistrations) == (2, 1)
        assert (counts.allocate_calls, counts.allocate_errors) == (4, 1)

        out = await agent.gpudctl("config", "reload")
        assert out.returncode == 0, out.stderr
        agent.config_file.write_text("version: v1\nhealth:\n  ignoredXids: [0]\n")
        out = await agent.gpudctl("config", "reload")
        assert out.returncode == 2
        await eventually(lambda: len(recorder.events(ConfigReloaded)) == 2)
        ok, refused = recorder.events(ConfigReloaded)
        assert ok.ok and ok.config_file == str(agent.config_file)
        assert not refused.ok and "positive" in refused.error
        assert dict(agent.daemon.stats.read().config_reloads) == {"ok": 1, "failed": 1}

    agent.run(scenario)
