"""The MIG planner and its in-memory model: minimal plans that obey NVML's rules.

Every plan here is replayed on :func:`gpud.mig.model.simulate`, which raises at the first call the
driver would refuse, so "the plan works" is checked, not assumed. The property tests draw random
layouts per GPU family (built through the model, so they are real layouts) and check that any
layout reaches any other within the rules, in no more calls than mig-parted's rebuild.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gpud.hw.errors import ErrorKind
from gpud.hw.types import MIG_UNSUPPORTED, MigLayoutState, MigMode, MigState, Placement
from gpud.mig.catalog import families
from gpud.mig.fit import FitError, ResolvedTarget, devices_of, resolve
from gpud.mig.layout import GpuTarget, bundled, device_counts, select
from gpud.mig.model import MigRuleError, catalog_state, simulate
from gpud.mig.planner import STEP_KINDS, Step, full_rebuild_cost, plan

A100_40 = 0x20B010DE
A100_80 = 0x20B210DE
H100 = 0x233010DE
A30 = 0x20B710DE
ON = MigState(MigMode.ENABLED, MigMode.ENABLED)
OFF = MigState(MigMode.DISABLED, MigMode.DISABLED)


def layout(devices: dict[str, int]) -> GpuTarget:
    return GpuTarget(True, tuple(sorted(devices.items())))


def resolved(target: GpuTarget, state: MigLayoutState) -> ResolvedTarget:
    out = resolve(target, state)
    assert isinstance(out, ResolvedTarget), out
    return out


def built(pci: int, devices: dict[str, int], index: int = 0) -> MigLayoutState:
    """A GPU carrying ``devices``, made the way gpud makes it from a blank GPU."""
    blank = catalog_state(pci, index)
    return simulate(blank, plan(blank, resolved(layout(devices), blank)))


def by_hand(pci: int, *gis: tuple[str, int, tuple[str, ...]]) -> MigLayoutState:
    """A GPU with GIs (profile, start, CI names in creation order) created explicitly."""
    state = catalog_state(pci)
    profiles = {p.name: p for p in state.profiles}
    steps: list[Step] = []
    for name, start, cis in gis:
        profile = profiles[name]
        placement = next(p for p in profile.placements if p.start == start)
        steps.append(Step("create-gi", 0, profile_id=profile.profile_id, placement=placement))
        for ci_name in cis:
            ci = next(c for c in profile.compute_profiles if c.name == ci_name)
            steps.append(Step("create-ci", 0, ci_profile_id=ci.profile_id, placement=placement))
    return simulate(state, steps)


def apply(state: MigLayoutState, devices: dict[str, int] | None) -> tuple[Step, ...]:
    """Plan ``devices`` (None: MIG off) on ``state`` and check the plan reaches it."""
    target = resolved(GpuTarget(False) if devices is None else layout(devices), state)
    steps = plan(state, target)
    after = simulate(state, steps)
    assert devices_of(after) == target.devices
    assert plan(after, target) == ()
    assert len(steps) <= full_rebuild_cost(state, target)
    return steps


def lines(steps: tuple[Step, ...]) -> list[str]:
    return [s.describe().removeprefix("GPU 0: ") for s in steps]


# ---- no change ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pci", "devices"),
    [
        (A100_40, {"1g.5gb": 7}),
        (A100_40, {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}),
        (A100_40, {"1c.3g.20gb": 3, "3g.20gb": 1}),
        (A30, {"1g.6gb": 2, "2g.12gb": 1}),
        (H100, {"7g.80gb": 1}),
    ],
)
def test_equal_layouts_plan_nothing(pci: int, devices: dict[str, int]) -> None:
    state = built(pci, devices)
    target = resolved(layout(devices), state)
    assert plan(state, target) == ()
    assert full_rebuild_cost(state, target) == 0


def test_same_devices_grouped_differently_is_already_applied() -> None:
    # two 2g GIs with one 1c each hold the same devices as one 2g GI with two
    state = by_hand(A100_40, ("2g.10gb", 0, ("1c.2g.10gb",)), ("2g.10gb", 2, ("1c.2g.10gb",)))
    assert plan(state, resolved(layout({"1c.2g.10gb": 2}), state)) == ()


def test_mig_off_stays_off() -> None:
    off = catalog_state(A100_40, enabled=False)
    assert plan(off, resolved(GpuTarget(False), off)) == ()
    t4 = MigLayoutState(0, "GPU-t4", 0x1EB810DE, MIG_UNSUPPORTED, (), ())
    assert plan(t4, ResolvedTarget(0, False)) == ()
    with pytest.raises(ValueError, match="cannot do MIG"):
        plan(t4, ResolvedTarget(0, True))
    with pytest.raises(ValueError, match="GPU 1"):
        plan(off, ResolvedTarget(1, False))


# ---- keeping what can stay ----------------------------------------------------------------------


def test_all_1g_to_balanced_keeps_the_1g_instances_that_can_stay() -> None:
    state = built(A100_40, {"1g.5gb": 7})
    assert [(gi.gi_id, str(gi.placement)) for gi in state.instances] == [
        (i + 1, f"{i}:1") for i in range(7)
    ]
    balanced = {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
    steps = apply(state, balanced)
    assert lines(steps) == [
        "destroy compute instance 0 (1g.5gb) in GPU instance 1",
        "destroy compute instance 0 (1g.5gb) in GPU instance 2",
        "destroy compute instance 0 (1g.5gb) in GPU instance 5",
        "destroy compute instance 0 (1g.5gb) in GPU instance 6",
        "destroy compute instance 0 (1g.5gb) in GPU instance 7",
        "destroy GPU instance 1 (1g.5gb at 0:1)",
        "destroy GPU instance 2 (1g.5gb at 1:1)",
        "destroy GPU instance 5 (1g.5gb at 4:1)",
        "destroy GPU instance 6 (1g.5gb at 5:1)",
        "destroy GPU instance 7 (1g.5gb at 6:1)",
        "create GPU instance 2g.10gb (profile 14) at 0:2",
        "create compute instance 2g.10gb (profile 1) in the new GPU instance at 0:2",
        "create GPU instance 3g.20gb (profile 9) at 4:4",
        "create compute instance 3g.20gb (profile 2) in the new GPU instance at 4:4",
    ]
    assert full_rebuild_cost(state, resolved(layout(balanced), state)) == 22
    after = simulate(state, steps)
    kept = [gi for gi in state.instances if gi.gi_id in (3, 4)]
    assert all(gi in after.instances for gi in kept)  # same IDs, placements, CIs and MIG UUIDs


def test_balanced_back_to_all_1g_keeps_the_two_1g() -> None:
    state = built(A100_40, {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1})
    steps = apply(state, {"1g.5gb": 7})
    kept_1g = [gi for gi in state.instances if gi.profile_id == 19]
    assert len(kept_1g) == 2
    touched = {s.gi_id for s in steps}
    assert not touched & {gi.gi_id for gi in kept_1g}
    assert [s.kind for s in steps].count("create-gi") == 5


def test_a_gi_with_the_right_profile_keeps_and_changes_only_its_cis() -> None:
    state = built(A100_40, {"3g.20gb": 2})
    steps = apply(state, {"3g.20gb": 1, "1c.3g.20gb": 3})
    assert lines(steps) == [
        "destroy compute instance 0 (3g.20gb) in GPU instance 1",
        "create compute instance 1c.3g.20gb (profile 0) in GPU instance 1",
        "create compute instance 1c.3g.20gb (profile 0) in GPU instance 1",
        "create compute instance 1c.3g.20gb (profile 0) in GPU instance 1",
    ]


def test_partial_cis_are_added_next_to_those_that_stay() -> None:
    state = by_hand(A100_40, ("2g.10gb", 0, ("1c.2g.10gb",)), ("1g.5gb", 6, ("1g.5gb",)))
    assert lines(apply(state, {"1c.2g.10gb": 2, "1g.5gb": 1})) == [
        "create compute instance 1c.2g.10gb (profile 0) in GPU instance 1"
    ]


def test_partial_cis_move_only_where_a_kept_one_blocks() -> None:
    # 1c at slices 0, 1, 2 of a 3g GI; a 2c may only start at 0, so the 1c kept is the one at 2
    state = by_hand(A100_40, ("3g.20gb", 4, ("1c.3g.20gb",) * 3))
    assert lines(apply(state, {"2c.3g.20gb": 1, "1c.3g.20gb": 1})) == [
        "destroy compute instance 0 (1c.3g.20gb) in GPU instance 1",
        "destroy compute instance 1 (1c.3g.20gb) in GPU instance 1",
        "create compute instance 2c.3g.20gb (profile 1) in GPU instance 1",
    ]


def test_partial_cis_keep_their_grouping_when_that_is_cheaper() -> None:
    state = by_hand(A100_40, ("2g.10gb", 0, ("1c.2g.10gb",)), ("2g.10gb", 2, ("1c.2g.10gb",)))
    assert lines(apply(state, {"1c.2g.10gb": 2, "2g.10gb": 1})) == [
        "create GPU instance 2g.10gb (profile 14) at 4:2",
        "create compute instance 2g.10gb (profile 1) in the new GPU instance at 4:2",
    ]


def test_half_built_gi_is_finished_when_wanted() -> None:
    state = by_hand(A100_40, ("1g.5gb", 3, ()), ("2g.10gb", 4, ("2g.10gb",)))
    assert lines(apply(state, {"1g.5gb": 1, "2g.10gb": 1})) == [
        "create compute instance 1g.5gb (profile 0) in GPU instance 1"
    ]


def test_half_built_gi_is_destroyed_when_not_wanted() -> None:
    state = by_hand(A100_40, ("1g.5gb", 0, ("1g.5gb",)), ("1g.5gb", 1, ()))
    # the devices already match; the empty GI is garbage all the same
    assert lines(apply(state, {"1g.5gb": 1})) == ["destroy GPU instance 2 (1g.5gb at 1:1)"]
    state = by_hand(A100_40, ("1g.5gb", 3, ()))
    assert lines(apply(state, {"2g.10gb": 1})) == [
        "destroy GPU instance 1 (1g.5gb at 3:1)",
        "create GPU instance 2g.10gb (profile 14) at 0:2",
        "create compute instance 2g.10gb (profile 1) in the new GPU instance at 0:2",
    ]


def test_a30_balanced_from_all_1g() -> None:
    state = built(A30, {"1g.6gb": 4})
    balanced = {"1g.6gb": 2, "2g.12gb": 1}
    steps = apply(state, balanced)
    assert len(steps) == 6
    assert full_rebuild_cost(state, resolved(layout(balanced), state)) == 14
    assert [s.kind for s in steps].count("create-gi") == 1


# ---- mode changes -------------------------------------------------------------------------------


def test_enabling_on_ampere_resets_then_creates() -> None:
    off = catalog_state(A100_40, enabled=False)
    assert lines(apply(off, {"3g.20gb": 2})) == [
        "enable MIG mode",
        "reset the GPU so the MIG mode change takes effect",
        "create GPU instance 3g.20gb (profile 9) at 0:4",
        "create compute instance 3g.20gb (profile 2) in the new GPU instance at 0:4",
        "create GPU instance 3g.20gb (profile 9) at 4:4",
        "create compute instance 3g.20gb (profile 2) in the new GPU instance at 4:4",
    ]
    assert lines(apply(catalog_state(A30, enabled=False), {})) == [
        "enable MIG mode",
        "reset the GPU so the MIG mode change takes effect",
    ]


def test_enabling_on_hopper_needs_no_reset() -> None:
    off = catalog_state(H100, enabled=False)
    assert lines(apply(off, {"7g.80gb": 1})) == [
        "enable MIG mode",
        "create GPU instance 7g.80gb (profile 0) at 0:8",
        "create compute instance 7g.80gb (profile 4) in the new GPU instance at 0:8",
    ]


def test_disabling_destroys_everything_first() -> None:
    steps = apply(built(A100_40, {"2g.10gb": 3}), None)
    assert [s.kind for s in steps] == [
        *["destroy-ci"] * 3,
        *["destroy-gi"] * 3,
        "set-mig-mode",
        "reset-gpu",
    ]
    assert [s.kind for s in apply(built(H100, {"4g.40gb": 1}), None)] == [
        "destroy-ci",
        "destroy-gi",
        "set-mig-mode",
    ]


def test_a_pending_mode_is_finished_or_cancelled() -> None:
    pending_on = replace(
        catalog_state(A100_40, enabled=False), mode=MigState(MigMode.DISABLED, MigMode.ENABLED)
    )
    assert lines(apply(pending_on, {})) == ["reset the GPU so the MIG mode change takes effect"]
    assert lines(apply(pending_on, None)) == ["disable MIG mode"]
    pending_off = replace(catalog_state(A100_40), mode=MigState(MigMode.ENABLED, MigMode.DISABLED))
    assert lines(apply(pending_off, {})) == ["enable MIG mode"]


# ---- steps --------------------------------------------------------------------------------------


def test_steps_describe_themselves_and_serialise() -> None:
    at = Placement(4, 4)
    steps = [
        Step("set-mig-mode", 1, enabled=False),
        Step("reset-gpu", 1),
        Step("destroy-ci", 1, gi_id=2, ci_id=0, ci_profile_id=2, placement=at, profile="3g.20gb"),
        Step("destroy-gi", 1, gi_id=2, profile_id=9, placement=at, profile="3g.20gb"),
        Step("create-gi", 1, profile_id=9, placement=at, profile="3g.20gb"),
        Step("create-ci", 1, gi_id=5, ci_profile_id=0, placement=at, profile="1c.3g.20gb"),
    ]
    assert [s.kind for s in steps] == list(STEP_KINDS)
    assert [s.describe() for s in steps] == [
        "GPU 1: disable MIG mode",
        "GPU 1: reset the GPU so the MIG mode change takes effect",
        "GPU 1: destroy compute instance 0 (3g.20gb) in GPU instance 2",
        "GPU 1: destroy GPU instance 2 (3g.20gb at 4:4)",
        "GPU 1: create GPU instance 3g.20gb (profile 9) at 4:4",
        "GPU 1: create compute instance 1c.3g.20gb (profile 0) in GPU instance 5",
    ]
    assert [s.to_dict() for s in steps[:2]] == [
        {"kind": "set-mig-mode", "gpu": 1, "enabled": False},
        {"kind": "reset-gpu", "gpu": 1},
    ]
    assert steps[4].to_dict() == {
        "kind": "create-gi",
        "gpu": 1,
        "profile_id": 9,
        "placement": {"start": 4, "size": 4},
        "profile": "3g.20gb",
    }
    json.dumps([s.to_dict() for s in steps])


# ---- the model refuses what NVML refuses --------------------------------------------------------


def _create_gi(name: str, start: int) -> Step:
    profile = next(p for p in families()["A100-40GB"].profiles if p.name == name)
    placement = next((p for p in profile.placements if p.start == start), Placement(start, 1))
    return Step("create-gi", 0, profile_id=profile.profile_id, placement=placement)


@pytest.mark.parametrize(
    ("state", "steps", "kind", "message"),
    [
        (
            catalog_state(A100_40, enabled=False),
            [Step("set-mig-mode", 0, enabled=True), _create_gi("1g.5gb", 0)],
            ErrorKind.NOT_SUPPORTED,
            "MIG mode is disabled (pending: enabled)",
        ),
        (
            catalog_state(A100_40),
            [_create_gi("3g.20gb", 4), _create_gi("2g.10gb", 4)],
            ErrorKind.INSUFFICIENT_RESOURCES,
            "overlaps GPU instance 1 at 4:4",
        ),
        (
            catalog_state(A100_40),
            [_create_gi("1g.5gb+me", 0), _create_gi("1g.5gb+me", 1)],
            ErrorKind.INSUFFICIENT_RESOURCES,
            "1g.5gb+me allows 1 instance(s) and 1 exist",
        ),
        (
            catalog_state(A100_40),
            [_create_gi("2g.10gb", 6)],
            ErrorKind.INVALID_ARGUMENT,
            "2g.10gb cannot sit at 6:1",
        ),
        (
            built(A100_40, {"7g.40gb": 1}),
            [Step("destroy-gi", 0, gi_id=1)],
            ErrorKind.IN_USE,
            "it still has 1 CI(s)",
        ),
        (
            built(A100_40, {"7g.40gb": 1}),
            [Step("set-mig-mode", 0, enabled=False)],
            ErrorKind.IN_USE,
            "1 GPU instance(s) exist",
        ),
        (
            built(A100_40, {"7g.40gb": 1}),
            [Step("destroy-ci", 0, gi_id=1, ci_id=0, placement=Placement(0, 4))],
            ErrorKind.INVALID_ARGUMENT,
            "GPU instance 1 sits at 0:8, not 0:4",
        ),
        (
            built(A100_40, {"2g.10gb": 1}),
            [Step("create-ci", 0, gi_id=1, ci_profile_id=0)],
            ErrorKind.INSUFFICIENT_RESOURCES,
            "no free aligned compute slices for 1c.2g.10gb in GPU instance 1",
        ),
        (
            catalog_state(A100_40),
            [Step("destroy-gi", 0, gi_id=3)],
            ErrorKind.NOT_FOUND,
            "no GPU instance 3",
        ),
        (
            MigLayoutState(0, "GPU-t4", 0x1EB810DE, MIG_UNSUPPORTED, (), ()),
            [Step("set-mig-mode", 0, enabled=True)],
            ErrorKind.NOT_SUPPORTED,
            "the GPU cannot do MIG",
        ),
        (
            catalog_state(A100_40),
            [Step("reset-gpu", 2)],
            ErrorKind.INVALID_ARGUMENT,
            "this is GPU 0",
        ),
    ],
)
def test_model_refuses_what_nvml_refuses(
    state: MigLayoutState, steps: list[Step], kind: ErrorKind, message: str
) -> None:
    with pytest.raises(MigRuleError) as err:
        simulate(state, steps)
    assert err.value.kind is kind
    assert str(err.value).endswith(f": {message} ({kind.name})")
    assert err.value.step == steps[-1]


def test_model_reset_applies_the_pending_mode_and_drops_instances() -> None:
    state = built(A100_40, {"1g.5gb": 7})
    assert state.mode == ON
    after = simulate(state, [Step("reset-gpu", 0)])
    assert after.instances == () and after.mode == ON


# ---- a node -------------------------------------------------------------------------------------


def test_a_dgx_a100_node_plans_fast() -> None:
    layouts = bundled()
    node = [built(A100_40, {"1g.5gb": 7}, i) for i in range(8)]
    targets = select(layouts, "all-balanced", [(s.index, s.pci_device_id) for s in node])

    def plan_node() -> int:
        count = 0
        for state in node:
            count += len(plan(state, resolved(targets[state.index], state)))
        return count

    assert plan_node() == 8 * 14
    times = []
    for _ in range(20):
        start = time.perf_counter()
        plan_node()
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.010, f"{statistics.median(times) * 1000:.2f} ms"


# ---- properties ---------------------------------------------------------------------------------

FAMILIES = sorted(families())


@st.composite
def states(
    draw: st.DrawFn, family: str, half_built: bool = True, off: bool = True
) -> MigLayoutState:
    """A random GPU of ``family``: MIG off (sometimes pending on), or on with random GIs at
    random placements and random CIs created in random order, possibly some GI without CI."""
    fam = families()[family]
    pci = fam.pci_device_ids[0]
    if off and draw(st.integers(0, 7)) == 0:
        state = catalog_state(pci, enabled=False)
        if fam.mode_change_needs_reset and draw(st.booleans()):
            state = replace(state, mode=MigState(MigMode.DISABLED, MigMode.ENABLED))
        return state
    state = catalog_state(pci)
    for _ in range(draw(st.integers(0, 7))):
        options = [
            Step("create-gi", 0, profile_id=p.profile_id, placement=at)
            for p in fam.profiles
            for at in p.placements
            if not any(gi.placement.overlaps(at) for gi in state.instances)
            and sum(gi.profile_id == p.profile_id for gi in state.instances) < p.max_count
        ]
        if not options:
            break
        step = draw(st.sampled_from(options))
        state = simulate(state, [step])
        profile = next(p for p in fam.profiles if p.profile_id == step.profile_id)
        for _ in range(draw(st.integers(0 if half_built else 1, 4))):
            cis = []
            for ci in profile.compute_profiles:
                create = Step("create-ci", 0, ci_profile_id=ci.profile_id, placement=step.placement)
                with contextlib.suppress(MigRuleError):  # only CIs that still fit
                    cis.append((create, simulate(state, [create])))
            if not cis:
                break
            state = draw(st.sampled_from(cis))[1]
    if not state.instances and fam.mode_change_needs_reset and draw(st.integers(0, 5)) == 0:
        state = replace(state, mode=MigState(MigMode.ENABLED, MigMode.DISABLED))
    return state


@st.composite
def random_targets(draw: st.DrawFn, family: str) -> GpuTarget:
    """Random device counts over the family's names, kept only when the fit check accepts."""
    fam = families()[family]
    names = sorted({ci.name for p in fam.profiles for ci in p.compute_profiles})
    picked = draw(st.dictionaries(st.sampled_from(names), st.integers(1, 3), max_size=4))
    target = layout(picked)
    assume(not isinstance(resolve(target, catalog_state(fam.pci_device_ids[0])), FitError))
    return target


@st.composite
def targets(draw: st.DrawFn, family: str) -> GpuTarget:
    if draw(st.integers(0, 9)) == 0:
        return GpuTarget(False)
    if draw(st.booleans()):
        return draw(random_targets(family))
    made = draw(states(family, half_built=False, off=False))
    return GpuTarget(True, device_counts(made))


PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@PROPERTY
@given(data=st.data())
def test_any_layout_reaches_any_other_within_the_rules(data: st.DataObject) -> None:
    family = data.draw(st.sampled_from(FAMILIES), label="family")
    before = data.draw(states(family), label="before")
    target = data.draw(targets(family), label="target")
    # anything that can be built must pass the fit check
    wanted = resolve(target, before)
    assert isinstance(wanted, ResolvedTarget), wanted
    steps = plan(before, wanted)
    assert all(step.gpu == before.index for step in steps)
    after = simulate(before, steps)  # raises at the first call NVML would refuse
    assert devices_of(after) == wanted.devices
    assert all(gi.compute_instances for gi in after.instances)
    mode = MigMode.ENABLED if target.enabled else MigMode.DISABLED
    assert after.mode == MigState(mode, mode)
    assert len(steps) <= full_rebuild_cost(before, wanted)
    assert plan(after, wanted) == ()
    assert plan(before, wanted) == steps  # deterministic
    # what the plan does not name is untouched: same GI, same CIs, same MIG UUIDs
    named = {s.gi_id for s in steps if s.kind != "create-ci"}
    if mode is MigMode.ENABLED and before.mode.current is MigMode.ENABLED:
        for gi in before.instances:
            if gi.gi_id not in named and not any(
                s.gi_id == gi.gi_id for s in steps if s.kind == "create-ci"
            ):
                assert gi in after.instances


@PROPERTY
@given(data=st.data())
def test_a_layout_already_in_place_needs_no_step(data: st.DataObject) -> None:
    family = data.draw(st.sampled_from(FAMILIES), label="family")
    state = data.draw(states(family, half_built=False), label="state")
    assume(state.mode.current is state.mode.pending)
    enabled = state.mode.current is MigMode.ENABLED
    target = resolved(GpuTarget(enabled, device_counts(state) if enabled else ()), state)
    assert plan(state, target) == ()
    assert full_rebuild_cost(state, target) == 0
