"""Resource sets per MIG strategy and time-slicing, on a DGX A100-like node.

The profile table below is a small hand-written slice of an A100-SXM4-40GB's (names, slices and
placements as NVML reports them); the code under test reads whatever the backend reports.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config.models import DevicePlugin, MigStrategy, Sharing, TimeSlicing
from gpud.config.nvidia_plugin import parse_nvidia_plugin_config
from gpud.hw.types import (
    NO_INSTANCE,
    CiProfile,
    ComputeInstance,
    GiProfile,
    GpuInfo,
    GpuInstance,
    MigLayoutState,
    MigMode,
    MigState,
    Placement,
)
from gpud.resources.allocate import DeviceSpec, container_allocation
from gpud.resources.gpus import resource_sets
from gpud.resources.mig import (
    caps_reader,
    mig_devices,
    mig_uuids_for_event,
    read_mig_caps,
)
from gpud.resources.sets import (
    ResourcePlan,
    StrategyError,
    base_id,
    build_resource_sets,
    mig_resource_name,
    still_present,
)
from tests.test_config_sharing import NVIDIA_FIXTURE

A100 = 0x20B010DE
MIG_ON = MigState(MigMode.ENABLED, MigMode.ENABLED)
MIG_OFF = MigState(MigMode.DISABLED, MigMode.DISABLED)


def _slots(size: int, starts: range) -> tuple[Placement, ...]:
    return tuple(Placement(s, size) for s in starts)


PROFILES = (
    GiProfile(19, "1g.5gb", 1, 1, 4864, 7, _slots(1, range(7)), (CiProfile(0, 1, 7, "1g.5gb"),)),
    GiProfile(
        20, "1g.5gb+me", 1, 1, 4864, 1, _slots(1, range(7)), (CiProfile(0, 1, 1, "1g.5gb+me"),)
    ),
    GiProfile(
        14,
        "2g.10gb",
        2,
        2,
        9856,
        3,
        _slots(2, range(0, 6, 2)),
        (CiProfile(0, 1, 2, "1c.2g.10gb"), CiProfile(1, 2, 1, "2g.10gb")),
    ),
    GiProfile(
        9,
        "3g.20gb",
        3,
        4,
        19968,
        2,
        _slots(4, range(0, 8, 4)),
        (
            CiProfile(0, 1, 3, "1c.3g.20gb"),
            CiProfile(1, 2, 1, "2c.3g.20gb"),
            CiProfile(2, 3, 1, "3g.20gb"),
        ),
    ),
    GiProfile(0, "7g.40gb", 7, 8, 40192, 1, _slots(8, range(1)), (CiProfile(4, 7, 1, "7g.40gb"),)),
)
BY_NAME = {p.name: p for p in PROFILES}


def gpu_uuid(i: int) -> str:
    return f"GPU-{i:08x}-aaaa-4bbb-8ccc-{i:012x}"


def mig_uuid(gpu: int, gi: int, ci: int) -> str:
    return f"MIG-{gpu:02x}{gi:02x}{ci:02x}00-dddd-4eee-8fff-{gpu * 10000 + gi * 100 + ci:012x}"


def gpu(i: int, mig: bool = False, lost: bool = False) -> GpuInfo:
    return GpuInfo(
        index=i,
        uuid=gpu_uuid(i),
        name="NVIDIA A100-SXM4-40GB",
        pci_bus_id=f"00000000:{0x07 + i:02X}:00.0",
        pci_device_id=A100,
        memory_mib=40960,
        minor_number=i,
        numa_node=i // 4,
        mig=MIG_ON if mig else MIG_OFF,
        lost=lost,
    )


# One GPU instance: (profile name, placement start, [(ci profile id, ci start), ...]).
GiSpec = tuple[str, int, list[tuple[int, int]]]


def layout(i: int, instances: list[GiSpec]) -> MigLayoutState:
    gis = []
    for gi_id, (name, start, cis) in enumerate(instances, start=1):
        profile = BY_NAME[name]
        sizes = {c.profile_id: c.slices for c in profile.compute_profiles}
        computes = tuple(
            ComputeInstance(
                ci_id, ci_profile, sizes[ci_profile], ci_start, mig_uuid(i, gi_id, ci_id)
            )
            for ci_id, (ci_profile, ci_start) in enumerate(cis)
        )
        gis.append(
            GpuInstance(
                gi_id, profile.profile_id, Placement(start, profile.memory_slices), computes
            )
        )
    return MigLayoutState(i, gpu_uuid(i), A100, MIG_ON, PROFILES, tuple(gis))


def full_ci(name: str) -> list[tuple[int, int]]:
    ci = BY_NAME[name].full_ci
    assert ci is not None
    return [(ci.profile_id, 0)]


def seven_1g(i: int, name: str = "1g.5gb") -> MigLayoutState:
    return layout(i, [(name, s, full_ci(name)) for s in range(7)])


def fake_caps(minor: int, gi: int, ci: int) -> tuple[str, ...]:
    base = 100 * minor + 10 * gi
    return (f"/dev/nvidia-caps/nvidia-cap{base}", f"/dev/nvidia-caps/nvidia-cap{base + ci + 1}")


PLAIN = [gpu(i) for i in range(8)]
ALL_MIG = [gpu(i, mig=True) for i in range(8)]
ALL_1G = {i: seven_1g(i) for i in range(8)}


def build(
    gpus: list[GpuInfo],
    states: dict[int, MigLayoutState],
    strategy: MigStrategy,
    sharing: Sharing | None = None,
    unhealthy: dict[str, str] | None = None,
) -> ResourcePlan:
    plan = build_resource_sets(gpus, states, unhealthy or {}, strategy, sharing, fake_caps)
    for rs in plan.sets:
        assert len(rs.resource) <= 63
        assert all(len(d.id) <= 63 for d in rs.devices)
        assert len({d.id for d in rs.devices}) == len(rs.devices)
    return plan


def counts(plan: ResourcePlan) -> dict[str, int]:
    return {rs.resource: len(rs.devices) for rs in plan.sets}


def time_slicing(*resources: dict[str, object], **kwargs: object) -> Sharing:
    return Sharing(time_slicing=TimeSlicing(resources=list(resources), **kwargs))


# ---- no MIG, strategy none ----------------------------------------------------------------


def test_plain_node_matches_the_whole_gpu_resource_sets() -> None:
    plan = build(PLAIN, {}, MigStrategy.NONE)
    assert plan.sets == resource_sets(PLAIN, {})
    assert plan.warnings == ()


def test_every_strategy_advertises_plain_gpus_alike() -> None:
    none = build(PLAIN, {}, MigStrategy.NONE)
    assert build(PLAIN, {}, MigStrategy.SINGLE) == none
    assert build(PLAIN, {}, MigStrategy.MIXED) == none


def test_no_gpus_no_resources() -> None:
    for strategy in MigStrategy:
        assert build([], {}, strategy) == ResourcePlan(())


def test_none_exposes_mig_enabled_gpus_whole_and_no_mig_devices() -> None:
    plan = build(ALL_MIG, ALL_1G, MigStrategy.NONE)
    assert counts(plan) == {"nvidia.com/gpu": 8}
    assert [d.id for d in plan.sets[0].devices] == [gpu_uuid(i) for i in range(8)]


# ---- single ---------------------------------------------------------------------------------


def test_single_all_1g_gives_56_mig_devices_as_nvidia_gpu() -> None:
    plan = build(ALL_MIG, ALL_1G, MigStrategy.SINGLE)
    assert counts(plan) == {"nvidia.com/gpu": 56}
    first = plan.sets[0].devices[0]
    assert first.id == first.visible_uuid == mig_uuid(0, 1, 0)
    assert first.gpu_uuid == gpu_uuid(0)
    assert first.index == "0:0"
    assert first.device_paths == (
        "/dev/nvidia0",
        "/dev/nvidia-caps/nvidia-cap10",
        "/dev/nvidia-caps/nvidia-cap11",
    )
    assert first.replica is None
    assert [d.index for d in plan.sets[0].devices[:8]] == [f"0:{j}" for j in range(7)] + ["1:0"]
    assert plan.sets[0].devices[-1].numa_node == 1


def test_single_refuses_mixed_profiles_and_names_them() -> None:
    states = dict(ALL_1G)
    states[5] = layout(5, [("2g.10gb", 0, full_ci("2g.10gb")), ("2g.10gb", 2, full_ci("2g.10gb"))])
    states[6] = layout(6, [("3g.20gb", 0, full_ci("3g.20gb"))])
    with pytest.raises(StrategyError) as err:
        build(ALL_MIG, states, MigStrategy.SINGLE)
    assert str(err.value) == (
        "migStrategy single needs one MIG profile on the node, found 3: "
        "1g.5gb on GPUs 0, 1, 2, 3, 4, 7; 2g.10gb on GPU 5; 3g.20gb on GPU 6; "
        "use migStrategy mixed"
    )


def test_single_refuses_full_gpus_beside_mig_gpus() -> None:
    gpus = [gpu(i, mig=i >= 2) for i in range(8)]
    with pytest.raises(StrategyError) as err:
        build(gpus, ALL_1G, MigStrategy.SINGLE)
    assert str(err.value) == (
        "migStrategy single needs every GPU in the same MIG mode, but GPUs 0, 1 have MIG "
        "disabled and GPUs 2, 3, 4, 5, 6, 7 have it enabled; use migStrategy mixed"
    )
    with pytest.raises(StrategyError, match="but GPU 0 has MIG disabled and GPU 1 has it"):
        build([gpu(0), gpu(1, mig=True)], ALL_1G, MigStrategy.SINGLE)


def test_single_refuses_a_mig_gpu_without_mig_devices() -> None:
    states = {i: s for i, s in ALL_1G.items() if i != 3}
    states[4] = layout(4, [])
    with pytest.raises(StrategyError, match="GPUs 3, 4 have MIG enabled but no MIG devices"):
        build(ALL_MIG, states, MigStrategy.SINGLE)


def test_what_stays_advertised_when_a_node_cannot_be_is_only_what_still_exists() -> None:
    before = build(ALL_MIG[:2], {i: seven_1g(i) for i in range(2)}, MigStrategy.SINGLE).sets
    # GPU 0 kept one of its seven instances, GPU 1 is whole again (its instances are gone, and
    # its GPU UUID was never advertised under single).
    now = {0: layout(0, [("1g.5gb", 0, full_ci("1g.5gb"))])}
    gpus = [gpu(0, mig=True), gpu(1)]
    (rs,) = still_present(before, gpus, now, {gpu_uuid(0): "critical XID 79"})
    assert rs.resource == "nvidia.com/gpu"
    assert [d.id for d in rs.devices] == [mig_uuid(0, 1, 0)]
    assert not rs.devices[0].healthy  # the health of now, not of the old advertisement
    (empty,) = still_present(before, [gpu(0), gpu(1)], {}, {})
    assert empty.resource == "nvidia.com/gpu" and empty.devices == ()


def test_single_counts_partial_compute_instances_as_their_own_profile() -> None:
    states = {i: layout(i, [("3g.20gb", 0, [(0, 0), (0, 1), (0, 2)])]) for i in range(2)}
    plan = build(ALL_MIG[:2], states, MigStrategy.SINGLE)
    assert counts(plan) == {"nvidia.com/gpu": 6}
    devices = mig_devices(ALL_MIG[0], states[0])
    assert {m.profile for m in devices} == {"1c.3g.20gb"}
    assert not any(m.spans_gi for m in devices)


# ---- mixed ----------------------------------------------------------------------------------


def test_mixed_all_1g_gives_56_mig_1g_5gb() -> None:
    plan = build(ALL_MIG, ALL_1G, MigStrategy.MIXED)
    assert counts(plan) == {"nvidia.com/mig-1g.5gb": 56}
    assert plan.warnings == ()
    # the same devices as single, under the profile's name
    single = build(ALL_MIG, ALL_1G, MigStrategy.SINGLE)
    assert plan.sets[0].devices == single.sets[0].devices


def test_mixed_serves_full_gpus_and_one_resource_per_profile() -> None:
    gpus = [gpu(i, mig=i >= 4) for i in range(8)]
    states = {
        4: seven_1g(4),
        5: layout(5, [("3g.20gb", 4, full_ci("3g.20gb")), ("2g.10gb", 0, full_ci("2g.10gb"))]),
        6: layout(6, [("7g.40gb", 0, full_ci("7g.40gb"))]),
        7: layout(7, [("1g.5gb+me", 0, full_ci("1g.5gb+me")), ("1g.5gb", 1, full_ci("1g.5gb"))]),
    }
    plan = build(gpus, states, MigStrategy.MIXED)
    assert counts(plan) == {
        "nvidia.com/gpu": 4,
        "nvidia.com/mig-1g.5gb": 8,
        "nvidia.com/mig-1g.5gb.me": 1,
        "nvidia.com/mig-2g.10gb": 1,
        "nvidia.com/mig-3g.20gb": 1,
        "nvidia.com/mig-7g.40gb": 1,
    }
    by = {rs.resource: rs for rs in plan.sets}
    # MIG index follows placement, not creation order: the 2g.10gb at slot 0 is 5:0.
    assert by["nvidia.com/mig-2g.10gb"].devices[0].index == "5:0"
    assert by["nvidia.com/mig-3g.20gb"].devices[0].index == "5:1"
    me = by["nvidia.com/mig-1g.5gb.me"].devices[0]
    assert (me.id, me.index) == (mig_uuid(7, 1, 0), "7:0")
    assert [d.index for d in by["nvidia.com/mig-1g.5gb"].devices][-1] == "7:1"


def test_mixed_excludes_partial_compute_instances_with_a_warning() -> None:
    states = {0: layout(0, [("3g.20gb", 0, [(0, 0), (1, 1)]), ("3g.20gb", 4, [(2, 0)])])}
    plan = build(ALL_MIG[:1], states, MigStrategy.MIXED)
    assert counts(plan) == {"nvidia.com/mig-3g.20gb": 1}
    assert plan.sets[0].devices[0].id == mig_uuid(0, 2, 0)
    assert plan.warnings == (
        "MIG devices whose compute instance does not span its GPU instance are not advertised "
        "under migStrategy mixed: 0:0 (1c.3g.20gb), 0:1 (2c.3g.20gb)",
    )


def test_mixed_warns_about_mig_gpus_without_devices() -> None:
    gpus = [gpu(0), gpu(1, mig=True), gpu(2, mig=True)]
    plan = build(gpus, {2: layout(2, [])}, MigStrategy.MIXED)
    assert counts(plan) == {"nvidia.com/gpu": 1}
    assert plan.warnings == ("GPUs 1, 2 have MIG enabled but no MIG devices: nothing to serve",)
    plan = build(gpus[:2], {}, MigStrategy.MIXED)
    assert plan.warnings == ("GPU 1 has MIG enabled but no MIG devices: nothing to serve",)


def test_mig_resource_names() -> None:
    assert mig_resource_name("1g.5gb") == "nvidia.com/mig-1g.5gb"
    assert mig_resource_name("1g.10gb+me") == "nvidia.com/mig-1g.10gb.me"
    assert mig_resource_name("1g.24gb+me.all") == "nvidia.com/mig-1g.24gb.me.all"


def test_result_does_not_depend_on_input_order() -> None:
    gpus = [gpu(i, mig=i % 2 == 0) for i in range(8)]
    states = {i: seven_1g(i) for i in range(0, 8, 2)}
    shuffled = list(gpus)
    random.Random(7).shuffle(shuffled)
    reversed_layout = {
        i: MigLayoutState(s.index, s.uuid, s.pci_device_id, s.mode, s.profiles, s.instances[::-1])
        for i, s in states.items()
    }
    assert build(shuffled, reversed_layout, MigStrategy.MIXED) == build(
        gpus, states, MigStrategy.MIXED
    )


def test_unknown_gi_profile_and_stale_layout_are_strategy_errors() -> None:
    bad = layout(0, [("1g.5gb", 0, full_ci("1g.5gb"))])
    bad = MigLayoutState(0, bad.uuid, A100, MIG_ON, (), bad.instances)
    with pytest.raises(StrategyError, match="profile ID 19, which the GPU did not report"):
        build(ALL_MIG[:1], {0: bad}, MigStrategy.MIXED)
    with pytest.raises(StrategyError, match="belongs to"):
        build(ALL_MIG[:1], {0: seven_1g(1)}, MigStrategy.MIXED)
    # strategy none never looks at MIG layouts
    assert counts(build(ALL_MIG[:1], {0: bad}, MigStrategy.NONE)) == {"nvidia.com/gpu": 1}


# ---- time-slicing ---------------------------------------------------------------------------


def fixture_sharing() -> Sharing:
    sharing = parse_nvidia_plugin_config(NVIDIA_FIXTURE).sharing
    assert sharing is not None
    return sharing


def test_fixture_sharing_gives_four_replicas_of_each_gpu() -> None:
    plan = build(PLAIN, {}, MigStrategy.NONE, fixture_sharing())
    assert counts(plan) == {"nvidia.com/gpu": 32}
    rs = plan.sets[0]
    assert [d.id for d in rs.devices[:5]] == [f"{gpu_uuid(0)}::{n}" for n in range(4)] + [
        f"{gpu_uuid(1)}::0"
    ]
    assert not rs.fail_requests_greater_than_one
    for d in rs.devices:
        n = int(d.id.rsplit("::", 1)[1])
        assert d.replica == n
        assert d.visible_uuid == d.gpu_uuid == base_id(d.id)
        assert d.device_paths == (f"/dev/nvidia{d.index}",)
        assert d.numa_node == int(d.index) // 4


def test_rename_by_default_serves_gpu_shared() -> None:
    sharing = time_slicing({"name": "gpu", "replicas": 4}, renameByDefault=True)
    assert counts(build(PLAIN, {}, MigStrategy.NONE, sharing)) == {"nvidia.com/gpu.shared": 32}


def test_explicit_rename_and_fail_requests_greater_than_one() -> None:
    sharing = time_slicing(
        {"name": "nvidia.com/gpu", "replicas": 2, "rename": "gpu-ts"},
        renameByDefault=True,
        failRequestsGreaterThanOne=True,
    )
    plan = build(PLAIN, {}, MigStrategy.NONE, sharing)
    assert counts(plan) == {"nvidia.com/gpu-ts": 16}
    assert plan.sets[0].fail_requests_greater_than_one


def test_mig_resources_can_be_time_sliced_and_others_stay_whole() -> None:
    gpus = [gpu(i, mig=i >= 4) for i in range(8)]
    states = {i: seven_1g(i) for i in range(4, 8)}
    sharing = time_slicing({"name": "mig-1g.5gb", "replicas": 3}, failRequestsGreaterThanOne=True)
    plan = build(gpus, states, MigStrategy.MIXED, sharing)
    assert counts(plan) == {"nvidia.com/gpu": 4, "nvidia.com/mig-1g.5gb": 84}
    gpus_rs, mig_rs = plan.sets
    assert not gpus_rs.fail_requests_greater_than_one
    assert mig_rs.fail_requests_greater_than_one
    d = mig_rs.devices[4]
    assert d.id == f"{mig_uuid(4, 2, 0)}::1"
    assert (d.visible_uuid, d.gpu_uuid, d.index, d.replica) == (
        mig_uuid(4, 2, 0),
        gpu_uuid(4),
        "4:1",
        1,
    )
    assert len(d.id) <= 63


def test_single_strategy_mig_devices_are_sliced_as_nvidia_gpu() -> None:
    plan = build(ALL_MIG, ALL_1G, MigStrategy.SINGLE, fixture_sharing())
    assert counts(plan) == {"nvidia.com/gpu": 224}


def test_sharing_an_absent_resource_is_a_warning() -> None:
    sharing = time_slicing({"name": "gpu", "replicas": 2}, {"name": "mig-2g.10gb", "replicas": 2})
    plan = build(PLAIN, {}, MigStrategy.MIXED, sharing)
    assert counts(plan) == {"nvidia.com/gpu": 16}
    assert plan.warnings == (
        "sharing.timeSlicing.resources[1]: nvidia.com/mig-2g.10gb is not advertised on this "
        "node, nothing to time-slice",
    )


def test_renaming_onto_an_advertised_resource_is_refused() -> None:
    gpus = [gpu(0), gpu(1, mig=True)]
    sharing = time_slicing({"name": "mig-1g.5gb", "replicas": 2, "rename": "gpu"})
    with pytest.raises(StrategyError, match=r"advertise nvidia\.com/gpu twice"):
        build(gpus, {1: seven_1g(1)}, MigStrategy.MIXED, sharing)


# ---- health ---------------------------------------------------------------------------------


def test_gpu_xid_takes_down_its_mig_devices_and_their_replicas() -> None:
    sharing = time_slicing({"name": "mig-1g.5gb", "replicas": 2})
    plan = build(ALL_MIG, ALL_1G, MigStrategy.MIXED, sharing, {gpu_uuid(3): "critical XID 79"})
    sick = {d.id for d in plan.sets[0].devices if not d.healthy}
    assert sick == {f"{mig_uuid(3, gi, 0)}::{n}" for gi in range(1, 8) for n in range(2)}
    assert plan.sets[0].healthy_count == 112 - 14


def test_mig_scoped_xid_takes_down_only_that_mig_device() -> None:
    sharing = time_slicing({"name": "mig-1g.5gb", "replicas": 2})
    bad = mig_uuid(3, 4, 0)
    plan = build(ALL_MIG, ALL_1G, MigStrategy.MIXED, sharing, {bad: "critical XID 94"})
    assert {d.id for d in plan.sets[0].devices if not d.healthy} == {f"{bad}::0", f"{bad}::1"}
    single = build(ALL_MIG, ALL_1G, MigStrategy.SINGLE, unhealthy={bad: "x"})
    assert [d.id for d in single.sets[0].devices if not d.healthy] == [bad]


def test_lost_gpu_takes_down_its_mig_devices() -> None:
    gpus = [gpu(0, mig=True), gpu(1, mig=True, lost=True)]
    plan = build(gpus, {0: seven_1g(0), 1: seven_1g(1)}, MigStrategy.MIXED)
    assert [d.healthy for d in plan.sets[0].devices] == [True] * 7 + [False] * 7


def test_whole_gpu_replicas_follow_the_gpu() -> None:
    plan = build(PLAIN, {}, MigStrategy.NONE, fixture_sharing(), {gpu_uuid(0): "lost"})
    assert [d.healthy for d in plan.sets[0].devices[:6]] == [False] * 4 + [True] * 2


# ---- MIG devices, events and capability nodes -----------------------------------------------


def test_mig_device_facts() -> None:
    state = layout(2, [("3g.20gb", 4, [(0, 2), (0, 0)]), ("2g.10gb", 0, full_ci("2g.10gb"))])
    devices = mig_devices(gpu(2, mig=True), state, fake_caps)
    assert [(m.index, m.profile, m.gi_id, m.ci_id, m.memory_mib) for m in devices] == [
        ("2:0", "2g.10gb", 2, 0, 9856),
        ("2:1", "1c.3g.20gb", 1, 1, 19968),
        ("2:2", "1c.3g.20gb", 1, 0, 19968),
    ]
    assert devices[0].spans_gi
    assert devices[0].device_paths == (
        "/dev/nvidia2",
        "/dev/nvidia-caps/nvidia-cap220",
        "/dev/nvidia-caps/nvidia-cap221",
    )
    assert mig_devices(gpu(2, mig=True), state)[0].device_paths == ("/dev/nvidia2",)


def test_events_map_to_mig_devices() -> None:
    state = layout(0, [("3g.20gb", 0, [(0, 0), (0, 1)]), ("3g.20gb", 4, full_ci("3g.20gb"))])
    assert mig_uuids_for_event(state, NO_INSTANCE, NO_INSTANCE) == ()
    assert mig_uuids_for_event(state, 1, 1) == (mig_uuid(0, 1, 1),)
    assert mig_uuids_for_event(state, 1, NO_INSTANCE) == (mig_uuid(0, 1, 0), mig_uuid(0, 1, 1))
    assert mig_uuids_for_event(state, 9, 0) == ()


def write_caps(root: Path, minor: int, gi: int, gi_minor: int, ci: int, ci_minor: int) -> None:
    gi_dir = root / "proc/driver/nvidia/capabilities" / f"gpu{minor}" / "mig" / f"gi{gi}"
    (gi_dir / f"ci{ci}").mkdir(parents=True, exist_ok=True)
    (gi_dir / "access").write_text(f"DeviceFileMinor: {gi_minor}\nDeviceFileMode: 292\n")
    (gi_dir / f"ci{ci}" / "access").write_text(
        f"DeviceFileMinor: {ci_minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"
    )


def test_read_mig_caps_from_procfs(tmp_path: Path) -> None:
    write_caps(tmp_path, 3, 2, 30, 0, 31)
    assert read_mig_caps(tmp_path, 3, 2, 0) == (
        "/dev/nvidia-caps/nvidia-cap30",
        "/dev/nvidia-caps/nvidia-cap31",
    )
    assert caps_reader(tmp_path)(3, 2, 0) == read_mig_caps(tmp_path, 3, 2, 0)
    assert read_mig_caps(tmp_path, 3, 2, 1) == ()  # no CI file: nothing rather than half
    assert read_mig_caps(tmp_path, 4, 2, 0) == ()
    (tmp_path / "proc/driver/nvidia/capabilities/gpu3/mig/gi2/access").write_text("garbage\n")
    assert read_mig_caps(tmp_path, 3, 2, 0) == ()


def test_built_mig_set_allocates_mig_uuids_with_cap_nodes(tmp_path: Path) -> None:
    write_caps(tmp_path, 0, 1, 12, 0, 13)
    write_caps(tmp_path, 0, 2, 21, 0, 22)
    states = {
        0: layout(0, [("3g.20gb", 0, full_ci("3g.20gb")), ("3g.20gb", 4, full_ci("3g.20gb"))])
    }
    sharing = time_slicing({"name": "mig-3g.20gb", "replicas": 2})
    plan = build_resource_sets(
        ALL_MIG[:1], states, {}, MigStrategy.MIXED, sharing, caps_reader(tmp_path)
    )
    (rs,) = plan.sets
    a, b = mig_uuid(0, 1, 0), mig_uuid(0, 2, 0)
    got = container_allocation(
        rs, [f"{b}::1", f"{a}::0", f"{b}::0"], DevicePlugin(pass_device_specs=True)
    )
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": f"{b},{a}"}
    assert got.device_specs == tuple(
        DeviceSpec(p, p, "rw")
        for p in (
            "/dev/nvidia0",
            "/dev/nvidia-caps/nvidia-cap21",
            "/dev/nvidia-caps/nvidia-cap22",
            "/dev/nvidia-caps/nvidia-cap12",
            "/dev/nvidia-caps/nvidia-cap13",
        )
    )


# ---- properties -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    per_gpu=st.lists(st.integers(0, 7), min_size=1, max_size=8),
    replicas=st.integers(2, 16),
    strategy=st.sampled_from([MigStrategy.MIXED, MigStrategy.NONE]),
)
def test_replica_counts_and_id_lengths(
    per_gpu: list[int], replicas: int, strategy: MigStrategy
) -> None:
    gpus = [gpu(i, mig=n > 0) for i, n in enumerate(per_gpu)]
    states = {
        i: layout(i, [("1g.5gb", s, full_ci("1g.5gb")) for s in range(n)])
        for i, n in enumerate(per_gpu)
        if n
    }
    sharing = time_slicing(
        {"name": "gpu", "replicas": replicas}, {"name": "mig-1g.5gb", "replicas": replicas}
    )
    plan = build(gpus, states, strategy, sharing)
    expected: dict[str, int] = {}
    if strategy is MigStrategy.NONE:
        expected["nvidia.com/gpu"] = len(per_gpu) * replicas
    else:
        whole = sum(1 for n in per_gpu if n == 0)
        if whole:
            expected["nvidia.com/gpu"] = whole * replicas
        if sum(per_gpu):
            expected["nvidia.com/mig-1g.5gb"] = sum(per_gpu) * replicas
    assert counts(plan) == expected
    for rs in plan.sets:
        for d in rs.devices:
            assert d.id == f"{d.visible_uuid}::{d.replica}"
