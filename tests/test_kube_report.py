"""The pure parts of gpud's Events and condition: which node events become which Event, the
rate limit, the outbox, and GPUHealthy from a snapshot. The API server and the running daemon
are in tests/test_kube_events.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gpud.hw.sim.backend import SimBackend
from gpud.hw.types import SystemInfo
from gpud.kube.condition import gpu_condition
from gpud.kube.outbox import Outbox, event_body
from gpud.kube.ratelimit import EventLimiter, Limits
from gpud.kube.report import MAX_MESSAGE, NORMAL, WARNING, Report, reports
from gpud.node.events import (
    BackendLost,
    BackendOpened,
    ConfigReloaded,
    HealthChanged,
    MigApplyStarted,
    MigLayoutApplied,
    MigLayoutFailed,
    MigLayoutRefused,
    PluginRegistered,
    ToolkitProblem,
    XidSeen,
)
from gpud.xids import xid_meaning
from tests.support.snapshot import all_of, snapshot

GPU = "GPU-aaaa"
MIGS = ("MIG-1", "MIG-2")


def one(*events: object, driver_lost: bool = False) -> list[tuple[str, str, str]]:
    found, _ = reports(events, driver_lost)  # type: ignore[arg-type]
    return [(r.type, r.reason, r.message) for r in found]


def change(uuid: str, healthy: bool, reason: str = "", before: str = "") -> HealthChanged:
    return HealthChanged(1.0, uuid, GPU, 3, healthy, reason, before)


# ---- the mapping ---------------------------------------------------------------------------


def test_a_critical_xid_is_one_warning_with_number_meaning_and_what_to_run() -> None:
    xid = XidSeen(1.0, GPU, 3, 79, (GPU,), critical=True, detail="pid=1")
    # The health changes it causes (the GPU and its MIG devices) add nothing.
    caused = [change(u, False, "critical XID 79") for u in (GPU, *MIGS)]
    [(kind, reason, message)] = one(xid, *caused)
    assert (kind, reason) == (WARNING, "GPUXidError")
    assert message == (
        f"XID 79 on GPU 3 ({GPU}): GPU has fallen off the bus (no longer reachable over PCIe). "
        "Driver: pid=1. The GPU (with any MIG devices on it) is out of service; kubelet sees "
        f"it Unhealthy and schedules no new pod on it. Once repaired: gpudctl device "
        f"set-healthy {GPU}"
    )
    scoped = XidSeen(1.0, GPU, 3, 94, MIGS, critical=True, gi_id=2, ci_id=0)
    [(_, _, message)] = one(scoped)
    assert message.startswith(
        f"XID 94 on GPU 3 ({GPU}), GPU instance 2 compute instance 0: contained ECC error"
    )
    assert "Out of service: MIG-1, MIG-2;" in message and "set-healthy MIG-1" in message
    # An application XID takes nothing out of service and says nothing to the cluster.
    assert one(XidSeen(1.0, GPU, 3, 13, (GPU,), critical=False)) == []


def test_every_xid_has_a_meaning_or_says_where_to_find_it() -> None:
    for xid in (13, 31, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 109, 119, 120):
        assert "not in gpud's table" not in xid_meaning(xid), xid
    assert xid_meaning(48).startswith("double-bit ECC error")
    assert "docs.nvidia.com/deploy/xid-errors" in xid_meaning(4242)


def test_health_changes_are_one_event_per_gpu_and_a_new_reason_while_out_says_nothing() -> None:
    lost = [change(u, False, "GPU lost: it fell off the bus") for u in (GPU, *MIGS)]
    [(kind, reason, message)] = one(*lost)
    assert (kind, reason) == (WARNING, "GPULost")
    assert message.startswith(f"GPU 3 ({GPU}) is out of service: GPU lost: it fell off the bus")
    assert "its 2 MIG devices with it" in message and "set-healthy" not in message
    assert one(change(GPU, False, "GPU lost: NVML cannot reach it", before="GPU lost")) == []

    back = [change(u, True, before="critical XID 48") for u in (GPU, *MIGS)]
    [(kind, reason, message)] = one(*back)
    assert (kind, reason) == (NORMAL, "GPUBackInService")
    assert message == (
        f"GPU 3 ({GPU}) and its 2 MIG devices are back in service (out before: critical XID "
        "48); kubelet sees it Healthy"
    )
    [(_, _, message)] = one(change("MIG-1", True, before="critical XID 94 on GPU instance 2"))
    assert message.startswith("MIG-1 (on GPU 3) is back in service")
    # A new device that starts healthy, or one that was never out, is no news.
    assert one(change(GPU, True)) == []


def test_mig_applies_and_refusals_name_the_layout_and_what_blocks() -> None:
    started = MigApplyStarted(1.0, "all-1g.5gb", "node label", 32, (0, 1), (GPU,))
    applied = MigLayoutApplied(2.0, "all-1g.5gb", "node label", 32, 1.25, (0, 1), "done")
    failed = MigLayoutFailed(2.0, "x", "", 3, 0.5, (1,), "GPU 1: reset failed: in use")
    refused = MigLayoutRefused(
        2.0, "x", "", "refused", "would take devices away:\n  a\n  b", ("ml/a/main uses M",)
    )
    assert one(started, applied, failed, refused) == [
        (
            NORMAL,
            "MigApplyStarted",
            "applying MIG layout 'all-1g.5gb' (from node label): 32 NVML calls on GPUs 0, 1; "
            "the devices of 1 GPU are withdrawn from kubelet until it is done",
        ),
        (
            NORMAL,
            "MigApplySucceeded",
            "MIG layout 'all-1g.5gb' (from node label) applied on GPUs 0, 1 with 32 NVML calls "
            "in 1.2 s",
        ),
        (
            WARNING,
            "MigApplyFailed",
            "MIG layout 'x' failed after 3 NVML calls: GPU 1: reset failed: in use",
        ),
        (
            WARNING,
            "MigApplyRefused",
            "MIG layout 'x' refused, nothing was changed: would take devices away. In use by: "
            "ml/a/main uses M",
        ),
    ]


def test_the_driver_back_is_news_only_after_it_was_lost_and_other_events_say_nothing() -> None:
    opened = BackendOpened(2.0, SystemInfo("nvml", "550.54"), 8)
    assert one(opened) == []
    found, lost = reports([BackendLost(1.0, "nvml", "no driver: libnvidia-ml.so.1 missing")])
    assert lost and found[0].reason == "GPUDriverUnavailable" and found[0].type == WARNING
    assert "libnvidia-ml.so.1 missing" in found[0].message
    [(kind, reason, message)] = one(opened, driver_lost=True)
    assert (kind, reason) == (NORMAL, "GPUDriverReady")
    assert message.startswith("the GPU driver is usable again (nvml backend, driver 550.54)")
    assert one(ToolkitProblem(1.0, "install nvidia-ctk"))[0][:2] == (
        WARNING,
        "ContainerToolkitProblem",
    )
    assert one(PluginRegistered(1.0, "r", "e", True), ConfigReloaded(1.0, "f")) == []
    long = MigLayoutFailed(2.0, "x", "", 3, 0.5, (1,), "y" * 5000)
    message = one(long)[0][2]
    assert len(message) == MAX_MESSAGE and message.endswith("(cut short)")


# ---- the rate limit --------------------------------------------------------------------------


def test_a_storm_on_one_key_passes_the_burst_then_one_a_period_saying_how_many_it_held() -> None:
    limits = Limits(key_burst=3, key_every_s=60, node_burst=100, node_every_s=1)
    limiter: EventLimiter[str] = EventLimiter(0.0, limits)
    passed = [limiter.offer("gpu0", f"x{i}", 0.0) for i in range(50)]
    assert [p.item for p in passed if p is not None] == ["x0", "x1", "x2"]
    assert limiter.holding("gpu0") == 47 and limiter.held_back_total == 47
    # Another key is not held back by this one.
    assert limiter.offer("gpu1", "y", 0.0) is not None
    assert limiter.release(30.0) == []
    assert limiter.next_release_s(30.0) == 30.0
    [summary] = limiter.release(60.0)
    assert (summary.item, summary.held_back, summary.since) == ("x49", 46, 0.0)
    assert limiter.next_release_s(60.0) is None
    # Held back again later: the next one that passes carries the count.
    limiter.offer("gpu0", "z0", 61.0)
    passed_again = limiter.offer("gpu0", "z1", 120.0)
    assert passed_again is not None and (passed_again.item, passed_again.held_back) == ("z1", 1)


def test_the_node_cap_bounds_all_keys_together() -> None:
    limits = Limits(key_burst=5, key_every_s=60, node_burst=20, node_every_s=6)
    limiter: EventLimiter[int] = EventLimiter(0.0, limits)
    sent = 0
    for second in range(60):
        for i in range(50):  # 3000 offers over a minute, across 8 keys
            if limiter.offer(i % 8, i, float(second)) is not None:
                sent += 1
        sent += len(limiter.release(float(second)))
    assert 20 <= sent <= 20 + 60 // 6 + 1
    # Each summary stands for the ones held back with it: none is unaccounted for.
    assert limiter.held_back_total >= 3000 - sent


def test_idle_keys_are_forgotten_so_the_map_stays_bounded() -> None:
    limiter: EventLimiter[int] = EventLimiter(0.0, Limits(key_every_s=1, node_burst=1000))
    for key in range(100):
        limiter.offer(key, key, 0.0)
    limiter.offer("busy", 1, 0.0)
    limiter.offer("busy", 2, 0.0)
    limiter.forget_idle(0.5)
    assert len(limiter._keys) == 101
    limiter.forget_idle(10.0)
    assert list(limiter._keys) == []


# ---- the outbox --------------------------------------------------------------------------------


def test_the_outbox_names_each_event_once_and_drops_the_oldest_beyond_its_bound() -> None:
    box = Outbox("gpu-node-1", limit=3)
    report = Report(WARNING, "GPUXidError", "XID 48", GPU, 1_700_000_000.0)
    assert all(box.add(report) for _ in range(3))
    names = []
    while (item := box.first()) is not None:
        names.append(item.name)
        box.done()
    assert len(set(names)) == 3 and all(n.startswith("gpu-node-1.") for n in names)
    assert names == sorted(names)
    for _ in range(4):
        box.add(report)
    assert len(box) == 3 and box.dropped == 1
    box.add(report, held_back=9, first_at=1_699_999_000.0)
    while len(box) > 1:
        box.done()
    body = event_body(box.first(), "gpu-node-1", "uid-1")  # type: ignore[arg-type]
    assert body["count"] == 10
    assert body["message"] == (
        "XID 48 (9 more like this since 2023-11-14T21:56:40Z were held back by gpud's Event "
        "rate limit)"
    )
    assert body["firstTimestamp"] == "2023-11-14T21:56:40Z"
    assert body["lastTimestamp"] == "2023-11-14T22:13:20Z"
    assert body["metadata"]["namespace"] == "default"


# ---- the condition -----------------------------------------------------------------------------


def test_gpuhealthy_from_a_snapshot(tmp_path: Path) -> None:
    backend = SimBackend("a100-40gb:2", tmp_path / "sim")
    backend.open()
    all_of(backend, 0, "1g.5gb")
    state = snapshot(backend)
    gpus = [g.uuid for g in state.gpus]
    migs = [d.uuid for d in state.devices if d.is_mig]
    ok = gpu_condition(state)
    assert (ok.status, ok.reason, ok.message) == (
        "True",
        "GPUsHealthy",
        "2 GPUs healthy, 7 MIG devices",
    )

    # Withdrawn during a MIG apply is not unhealthy; the message says the change is under way.
    changing = gpu_condition(snapshot(backend, withdrawn=[gpus[0]]))
    assert changing.status == "True"
    assert changing.message.endswith(
        "; MIG layout being changed on GPU 0: their devices are withdrawn from kubelet until "
        "it is done"
    )

    broken = gpu_condition(
        snapshot(backend, unhealthy={gpus[0]: "critical XID 48", gpus[1]: "GPU lost"})
    )
    assert (broken.status, broken.reason) == ("False", "GPUUnhealthy")
    assert broken.message == (
        f"9 of 9 devices out of service: {gpus[0]} (GPU 0 with its 7 MIG devices): critical "
        f"XID 48; {gpus[1]} (GPU 1): GPU lost"
    )
    one_mig = gpu_condition(snapshot(backend, unhealthy={migs[2]: "critical XID 94"}))
    assert one_mig.message == (
        f"1 of 9 devices out of service: {migs[2]} (MIG 1g.5gb on GPU 0): critical XID 94"
    )

    no_driver = gpu_condition(dataclasses.replace(state, backend_error="no driver: x", gpus=()))
    assert (no_driver.status, no_driver.reason) == ("Unknown", "GPUDriverUnavailable")
    assert no_driver.message == "gpud cannot read the GPUs: no driver: x"
    none = gpu_condition(dataclasses.replace(state, gpus=(), devices=()))
    assert (none.status, none.reason) == ("Unknown", "NoGPUs")
