"""Pure decisions: what an event means for a GPU, and what kubelet is offered."""

from __future__ import annotations

from gpud.config.models import Health
from gpud.health import XidPolicy, initial_reasons, unhealthy_reason
from gpud.hw.types import EventKind, GpuInfo, HwEvent
from gpud.resources.gpus import GPU_RESOURCE, resource_sets

POLICY = XidPolicy.from_config(Health())


def gpu(index: int, *, lost: bool = False, numa: int | None = 0) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index:08x}-0000-0000-0000-000000000000",
        name="NVIDIA A100-SXM4-40GB",
        pci_bus_id=f"00000000:{index:02X}:00.0",
        pci_device_id=0x20B010DE,
        memory_mib=40960,
        minor_number=index,
        numa_node=numa,
        lost=lost,
    )


def test_default_policy_ignores_application_xids_only() -> None:
    for xid in (13, 31, 43, 45, 68, 109):
        assert unhealthy_reason(HwEvent(EventKind.XID, "GPU-a", xid=xid), POLICY) is None
    for xid in (48, 63, 64, 74, 79, 94, 95):
        assert unhealthy_reason(HwEvent(EventKind.XID, "GPU-a", xid=xid), POLICY) == (
            f"critical XID {xid}"
        )


def test_mig_scoped_xid_says_where_and_lost_gpu_says_what_to_do() -> None:
    scoped = HwEvent(EventKind.XID, "GPU-a", xid=94, gi_id=3, ci_id=0)
    assert unhealthy_reason(scoped, POLICY) == "critical XID 94 on GPU instance 3"
    lost = unhealthy_reason(HwEvent(EventKind.GPU_LOST, "GPU-a"), POLICY)
    assert lost is not None and "reboot" in lost


def test_initial_reasons_keep_known_drop_vanished_and_add_lost() -> None:
    a, b, c = gpu(0), gpu(1, lost=True), gpu(2)
    reasons = initial_reasons([a, b, c], {a.uuid: "critical XID 79", "GPU-gone": "x"})
    assert reasons[a.uuid] == "critical XID 79"
    assert "GPU-gone" not in reasons
    assert b.uuid in reasons and "lost" in reasons[b.uuid]
    assert c.uuid not in reasons


def test_initial_reasons_keep_a_mig_device_s_own_reason_while_it_exists() -> None:
    known = {"MIG-kept": "critical XID 94 on GPU instance 2", "MIG-destroyed": "critical XID 94"}
    reasons = initial_reasons([gpu(0)], known, {"MIG-kept", "MIG-other"})
    assert reasons == {"MIG-kept": "critical XID 94 on GPU instance 2"}


def test_whole_gpus_are_offered_by_uuid_with_numa_and_health() -> None:
    gpus = [gpu(1, numa=1), gpu(0, numa=0), gpu(2, numa=None, lost=True)]
    (rs,) = resource_sets(gpus, {gpus[0].uuid: "critical XID 79"})
    assert rs.resource == GPU_RESOURCE == "nvidia.com/gpu"
    assert rs.socket_name == "nvidia-gpu.sock"
    assert [d.index for d in rs.devices] == ["0", "1", "2"]  # by index
    by_index = {d.index: d for d in rs.devices}
    assert by_index["0"].healthy and by_index["0"].numa_node == 0
    assert not by_index["1"].healthy  # XID
    assert not by_index["2"].healthy and by_index["2"].numa_node is None  # lost
    assert by_index["1"].id == by_index["1"].visible_uuid == gpus[0].uuid
    assert by_index["0"].device_paths == ("/dev/nvidia0",)
    assert rs.healthy_count == 1


def test_no_gpus_no_plugin() -> None:
    assert resource_sets([], {}) == ()
