"""MIG on the simulated backend: NVML's rules and error kinds, persistence and fault injection.

The rules are those of shared/reference/mig-profiles.md §1, §3, §4, §7 and §8; the worked examples
of §4 are checked literally. Profile IDs are the A100/H100 device IDs (19 = 1g, 20 = 1g+me,
15 = 1g double memory, 14 = 2g, 9 = 3g, 5 = 4g, 0 = 7g), CI profile IDs their enum values.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.hw.backend import MigBackend
from gpud.hw.errors import BackendUnavailable, ErrorKind, HwError
from gpud.hw.sim import backend as sim_backend
from gpud.hw.sim.backend import SimBackend, SimFaults, power_cycle_state, write_faults
from gpud.hw.sim.machines import MODELS
from gpud.hw.sim.mig import MIG_UUID, layout_problems
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    CiProfile,
    GiProfile,
    GpuInstance,
    GpuProcess,
    MigLayoutState,
    MigMode,
    MigState,
    Placement,
)
from gpud.mig.catalog import Family, families, family_for
from tests.support.migref import described, reference

OFF = MigState(MigMode.DISABLED, MigMode.DISABLED)
ON = MigState(MigMode.ENABLED, MigMode.ENABLED)
ENABLE_PENDING = MigState(MigMode.DISABLED, MigMode.ENABLED)
DISABLE_PENDING = MigState(MigMode.ENABLED, MigMode.DISABLED)

# A100/H100-class device profile IDs and CI profile IDs.
P1G, P1G_ME, P1G_2M, P2G, P3G, P4G, P7G = 19, 20, 15, 14, 9, 5, 0
C1, C2, C3, C4, C7 = 0, 1, 2, 3, 4

A100 = families()["A100-40GB"]


def opened(spec: str, state_dir: Path) -> SimBackend:
    backend = SimBackend(spec, state_dir)
    backend.open()
    return backend


def mig_on(spec: str, state_dir: Path, *indices: int) -> SimBackend:
    """A backend whose GPUs ``indices`` (default: GPU 0) have MIG enabled and in effect."""
    backend = opened(spec, state_dir)
    for index in indices or (0,):
        backend.set_mig_mode(index, True)
        backend.reset_gpu(index)
    return backend


def refused(kind: ErrorKind, call: Callable[[], object]) -> HwError:
    with pytest.raises(HwError) as caught:
        call()
    assert caught.value.kind is kind, str(caught.value)
    return caught.value


def at(start: int, size: int) -> Placement:
    return Placement(start, size)


def reopened(backend: SimBackend, index: int = 0) -> MigLayoutState:
    """GPU ``index`` as a fresh backend reads it from the state file."""
    return opened(backend.machine.spec, backend.state_path.parent.parent).mig_state(index)


# --- protocol and catalog ------------------------------------------------------------------------


def test_is_a_mig_backend(tmp_path: Path) -> None:
    assert isinstance(SimBackend("t4x1", tmp_path), MigBackend)


@pytest.mark.parametrize("key", sorted(k for k, m in MODELS.items() if m.mig_capable))
def test_every_mig_model_has_its_catalog_family(key: str) -> None:
    model = MODELS[key]
    family = family_for(model.pci_device_id)

    assert family is not None
    assert family.name == model.mig_family


# --- mig_state -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "family"), [("dgx-a100", "A100-40GB"), ("a30x4", "A30-24GB")])
def test_mig_state_reports_profiles_even_while_mig_is_off(
    tmp_path: Path, spec: str, family: str
) -> None:
    backend = opened(spec, tmp_path)
    gpu = backend.gpus()[1]

    state = backend.mig_state(1)

    assert (state.index, state.uuid, state.pci_device_id) == (1, gpu.uuid, gpu.pci_device_id)
    assert (state.mode, state.instances) == (OFF, ())
    assert described(state.profiles, family) == reference(family)


@pytest.mark.parametrize("spec", ["t4x1", "l4x2"])
def test_mig_state_of_a_gpu_without_mig_is_empty(tmp_path: Path, spec: str) -> None:
    state = opened(spec, tmp_path).mig_state(0)

    assert (state.mode, state.profiles, state.instances) == (MIG_UNSUPPORTED, (), ())


def test_mig_state_lists_instances_by_gi_id_with_their_cis(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    first = backend.create_gpu_instance(0, P3G, at(4, 4))
    backend.create_gpu_instance(0, P1G, at(0, 1))
    backend.destroy_gpu_instance(0, first.gi_id)
    backend.create_gpu_instance(0, P2G, at(2, 2))  # takes the freed, lowest ID
    ci = backend.create_compute_instance(0, first.gi_id, C2)

    instances = backend.mig_state(0).instances

    assert [(gi.gi_id, gi.profile_id, gi.placement) for gi in instances] == [
        (1, P2G, at(2, 2)),
        (2, P1G, at(0, 1)),
    ]
    assert instances[0].compute_instances == (ci,)
    assert instances[1].compute_instances == ()


def test_mig_state_is_fast(tmp_path: Path) -> None:
    backend = mig_on("dgx-a100", tmp_path, *range(8))
    for index in range(8):
        for start in range(7):
            gi = backend.create_gpu_instance(index, P1G, at(start, 1))
            backend.create_compute_instance(index, gi.gi_id, C1)

    best = float("inf")
    for _ in range(20):
        began = time.perf_counter()
        for index in range(8):
            backend.mig_state(index)
        best = min(best, time.perf_counter() - began)

    assert best < 0.001


# --- set_mig_mode and reset_gpu ------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["a100-40gb:2", "a100-80gb:2", "a30:2"])
def test_ampere_mode_change_is_pending_until_reset(tmp_path: Path, spec: str) -> None:
    backend = opened(spec, tmp_path)

    assert backend.set_mig_mode(1, True) == ENABLE_PENDING
    assert backend.mig_state(1).mode == ENABLE_PENDING
    assert [gpu.mig for gpu in backend.gpus()] == [OFF, ENABLE_PENDING]
    assert backend.reset_gpu(1) == ON
    assert [gpu.mig for gpu in backend.gpus()] == [OFF, ON]

    assert backend.set_mig_mode(1, False) == DISABLE_PENDING
    assert backend.gpus()[1].mig == DISABLE_PENDING
    assert backend.reset_gpu(1) == OFF


@pytest.mark.parametrize("spec", ["h100-80gb:2", "h200:2", "dgx-h100"])
def test_hopper_mode_change_is_immediate(tmp_path: Path, spec: str) -> None:
    backend = opened(spec, tmp_path)

    assert backend.set_mig_mode(1, True) == ON
    assert backend.gpus()[1].mig == ON
    assert backend.mig_state(1).mode == ON
    backend.create_gpu_instance(1, P7G, at(0, 8))  # no reset needed
    backend.destroy_gpu_instance(1, 1)
    assert backend.set_mig_mode(1, False) == OFF
    assert backend.gpus()[1].mig == OFF


def test_a_pending_enable_can_be_withdrawn(tmp_path: Path) -> None:
    backend = opened("a100-40gb:1", tmp_path)
    backend.set_mig_mode(0, True)

    assert backend.set_mig_mode(0, False) == OFF
    assert backend.reset_gpu(0) == OFF


@pytest.mark.parametrize(
    ("spec", "enabled", "expected"),
    [
        ("a100-40gb:1", False, OFF),
        ("h100-80gb:1", False, OFF),
        ("a100-40gb:1", True, ENABLE_PENDING),
        ("h100-80gb:1", True, ON),
    ],
)
def test_asking_for_the_pending_mode_again_succeeds_and_counts(
    tmp_path: Path, spec: str, enabled: bool, expected: MigState
) -> None:
    backend = opened(spec, tmp_path)
    if enabled:
        backend.set_mig_mode(0, True)
    backend.set_faults(SimFaults(fail_after=1))

    assert backend.set_mig_mode(0, enabled) == expected
    assert backend.faults().fail_after == 0  # the no-op was one mutation
    refused(ErrorKind.UNKNOWN, lambda: backend.set_mig_mode(0, enabled))


def test_enabling_again_keeps_the_instances(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.create_gpu_instance(0, P7G, at(0, 8))

    assert backend.set_mig_mode(0, True) == ON
    assert len(backend.mig_state(0).instances) == 1


def test_mode_change_refusals(tmp_path: Path) -> None:
    t4 = opened("t4x1", tmp_path)
    refused(ErrorKind.NOT_SUPPORTED, lambda: t4.set_mig_mode(0, True))
    refused(ErrorKind.NOT_SUPPORTED, lambda: t4.set_mig_mode(0, False))
    assert t4.gpus()[0].mig == MIG_UNSUPPORTED


@pytest.mark.parametrize("spec", ["a100-40gb:1", "h100-80gb:1"])
def test_disabling_while_gpu_instances_exist_is_in_use(tmp_path: Path, spec: str) -> None:
    backend = mig_on(spec, tmp_path)
    backend.create_gpu_instance(0, P1G, at(3, 1))

    error = refused(ErrorKind.IN_USE, lambda: backend.set_mig_mode(0, False))

    assert "destroy them" in str(error)
    assert backend.mig_state(0).mode == ON


@pytest.mark.parametrize("spec", ["a100-40gb:2", "h100-80gb:2"])
@pytest.mark.parametrize("enabled", [True, False])
def test_mode_change_with_a_process_on_the_gpu_is_in_use(
    tmp_path: Path, spec: str, enabled: bool
) -> None:
    backend = opened(spec, tmp_path)
    backend.set_faults(SimFaults(processes=((1, 4242, None),)))

    refused(ErrorKind.IN_USE, lambda: backend.set_mig_mode(1, enabled))
    assert backend.mig_state(1).mode == OFF
    assert backend.set_mig_mode(0, True).pending is MigMode.ENABLED  # other GPUs are free


def test_reset_applies_the_pending_mode_and_destroys_instances(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = backend.create_gpu_instance(0, P3G, at(0, 4))
    backend.create_compute_instance(0, gi.gi_id, C3)

    assert backend.reset_gpu(0) == ON
    assert backend.mig_state(0).instances == ()
    assert reopened(backend).instances == ()


def test_reset_on_hopper_destroys_instances_and_keeps_the_mode(tmp_path: Path) -> None:
    backend = mig_on("h100-80gb:1", tmp_path)
    backend.create_gpu_instance(0, P1G_2M, at(6, 2))

    assert backend.reset_gpu(0) == ON
    assert backend.mig_state(0).instances == ()


@pytest.mark.parametrize("mig_uuid_of_process", [False, True])
def test_reset_with_processes_is_in_use(tmp_path: Path, mig_uuid_of_process: bool) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = backend.create_gpu_instance(0, P7G, at(0, 8))
    ci = backend.create_compute_instance(0, gi.gi_id, C7)
    backend.set_faults(
        SimFaults(processes=((0, 77, ci.mig_uuid if mig_uuid_of_process else None),))
    )
    before = backend.mig_state(0)

    refused(ErrorKind.IN_USE, lambda: backend.reset_gpu(0))
    assert backend.mig_state(0) == before


def test_reset_of_a_gpu_without_mig(tmp_path: Path) -> None:
    assert opened("t4x1", tmp_path).reset_gpu(0) == MIG_UNSUPPORTED


# --- GPU instances -------------------------------------------------------------------------------


def test_create_gpu_instance_returns_it_without_cis(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)

    gi = backend.create_gpu_instance(0, P3G, at(4, 4))

    assert gi == GpuInstance(1, P3G, at(4, 4), ())
    assert backend.mig_state(0).instances == (gi,)


def test_gi_ids_are_the_drivers_not_the_placements(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:2", tmp_path, 0, 1)

    high = backend.create_gpu_instance(0, P3G, at(4, 4))
    low = backend.create_gpu_instance(1, P3G, at(0, 4))
    second = backend.create_gpu_instance(0, P3G, at(0, 4))

    assert (high.gi_id, low.gi_id, second.gi_id) == (1, 1, 2)
    backend.destroy_gpu_instance(0, 1)
    assert backend.create_gpu_instance(0, P2G, at(4, 2)).gi_id == 1


@pytest.mark.parametrize(("spec", "count", "profile"), [("a100-40gb:1", 7, P1G), ("a30:1", 4, 14)])
def test_gi_ids_run_from_1_to_the_max_gpu_instances(
    tmp_path: Path, spec: str, count: int, profile: int
) -> None:
    backend = mig_on(spec, tmp_path)

    ids = [backend.create_gpu_instance(0, profile, at(start, 1)).gi_id for start in range(count)]

    assert ids == list(range(1, count + 1))


@pytest.mark.parametrize(
    ("mode", "profile", "placement", "kind"),
    [
        ("off", P1G, at(0, 1), ErrorKind.NOT_SUPPORTED),
        ("enable pending", P1G, at(0, 1), ErrorKind.NOT_SUPPORTED),
        ("on", 99, at(0, 1), ErrorKind.INVALID_ARGUMENT),
        ("on", 1, at(0, 2), ErrorKind.INVALID_ARGUMENT),  # the 2g enum, not its ID (14)
        ("on", P2G, at(6, 2), ErrorKind.INVALID_ARGUMENT),  # 2g cannot start at 6
        ("on", P1G, at(7, 1), ErrorKind.INVALID_ARGUMENT),  # no 1g at memory slice 7
        ("on", P3G, at(0, 3), ErrorKind.INVALID_ARGUMENT),  # a 3g takes 4 memory slices
        ("on", P3G, at(2, 4), ErrorKind.INVALID_ARGUMENT),
        ("on", P7G, at(0, 7), ErrorKind.INVALID_ARGUMENT),
        ("on", P1G_2M, at(1, 2), ErrorKind.INVALID_ARGUMENT),
    ],
)
def test_create_gpu_instance_refusals(
    tmp_path: Path, mode: str, profile: int, placement: Placement, kind: ErrorKind
) -> None:
    backend = opened("a100-40gb:1", tmp_path)
    if mode != "off":
        backend.set_mig_mode(0, True)
    if mode == "on":
        backend.reset_gpu(0)

    refused(kind, lambda: backend.create_gpu_instance(0, profile, placement))
    assert backend.mig_state(0).instances == ()


def test_create_on_a_gpu_without_mig_is_not_supported(tmp_path: Path) -> None:
    backend = opened("l4x2", tmp_path)

    refused(ErrorKind.NOT_SUPPORTED, lambda: backend.create_gpu_instance(1, P1G, at(0, 1)))


def test_create_after_a_pending_disable_is_still_allowed(tmp_path: Path) -> None:
    # MIG is still current until the reset; the reset then takes the new instance away.
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.set_mig_mode(0, False)

    backend.create_gpu_instance(0, P1G, at(0, 1))
    assert backend.reset_gpu(0) == OFF
    assert backend.mig_state(0).instances == ()


def steps_of(family: Family, steps: list[tuple[str, int]]) -> list[tuple[int, Placement]]:
    """``(profile name, start)`` steps as ``(profile ID, placement)``."""
    out = []
    for name, start in steps:
        profile = family.profile(name)
        assert profile is not None, name
        out.append((profile.profile_id, at(start, profile.memory_slices)))
    return out


WORKED_EXAMPLES = {
    # mig-profiles.md §4, "Worked examples (A100-40GB)": (steps, kind of the last step or None).
    "3g+3g+1g": ([("3g.20gb", 0), ("3g.20gb", 4), ("1g.5gb", 6)], ErrorKind.INSUFFICIENT_RESOURCES),
    "3-2-1-1": ([("3g.20gb", 4), ("2g.10gb", 2), ("1g.5gb", 0), ("1g.5gb", 1)], None),
    "2-1-1-1-1-1": (
        [("2g.10gb", 4), *(("1g.5gb", s) for s in (0, 1, 2, 3, 6))],
        None,
    ),
    "1g.5gb x7": ([("1g.5gb", s) for s in range(7)], None),
    "1g.10gb x4": ([("1g.10gb", s) for s in (0, 2, 4, 6)], None),
    "4g+3g": ([("4g.20gb", 0), ("3g.20gb", 4)], None),
    "4g+2g+1g": ([("4g.20gb", 0), ("2g.10gb", 4), ("1g.5gb", 6)], None),
    "2g x3 + 1g.5gb": ([("2g.10gb", s) for s in (0, 2, 4)] + [("1g.5gb", 6)], None),
    "2g x3 + 1g.10gb": ([("2g.10gb", s) for s in (0, 2, 4)] + [("1g.10gb", 6)], None),
    "1g.5gb+me x2": ([("1g.5gb+me", 0), ("1g.5gb+me", 1)], ErrorKind.INSUFFICIENT_RESOURCES),
    "2g at 6": ([("2g.10gb", 6)], ErrorKind.INVALID_ARGUMENT),
    "1g.10gb x5": (
        [*(("1g.10gb", s) for s in (0, 2, 4, 6)), ("1g.10gb", 0)],
        ErrorKind.INSUFFICIENT_RESOURCES,
    ),
}


@pytest.mark.parametrize("example", sorted(WORKED_EXAMPLES))
def test_worked_examples(tmp_path: Path, example: str) -> None:
    steps, kind = WORKED_EXAMPLES[example]
    backend = mig_on("a100-40gb:1", tmp_path)
    calls = steps_of(A100, steps)
    last = len(calls) - 1 if kind else len(calls)

    for profile_id, placement in calls[:last]:
        backend.create_gpu_instance(0, profile_id, placement)
    if kind:
        profile_id, placement = calls[-1]
        refused(kind, lambda: backend.create_gpu_instance(0, profile_id, placement))

    placed = [(gi.profile_id, gi.placement) for gi in backend.mig_state(0).instances]
    assert sorted(placed) == sorted(calls[:last])
    assert layout_problems(A100, backend.mig_state(0).instances) == []


def test_3g_3g_leaves_no_slice_for_any_1g(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.create_gpu_instance(0, P3G, at(0, 4))
    backend.create_gpu_instance(0, P3G, at(4, 4))

    for start in range(7):
        error = refused(
            ErrorKind.INSUFFICIENT_RESOURCES,
            lambda start=start: backend.create_gpu_instance(0, P1G, at(start, 1)),
        )
        assert "share memory slices" in str(error)


@pytest.mark.parametrize("profile", [p for p in A100.profiles if p.name != "7g.40gb"])
def test_7g_leaves_room_for_nothing(tmp_path: Path, profile) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.create_gpu_instance(0, P7G, at(0, 8))

    for placement in profile.placements:
        refused(
            ErrorKind.INSUFFICIENT_RESOURCES,
            lambda placement=placement: backend.create_gpu_instance(
                0, profile.profile_id, placement
            ),
        )
    refused(ErrorKind.INSUFFICIENT_RESOURCES, lambda: backend.create_gpu_instance(0, P7G, at(0, 8)))


def test_a30_has_four_slices(tmp_path: Path) -> None:
    backend = mig_on("a30x4", tmp_path, 2)

    backend.create_gpu_instance(2, 5, at(0, 2))  # 2g.12gb
    backend.create_gpu_instance(2, 14, at(2, 1))  # 1g.6gb
    backend.create_gpu_instance(2, 21, at(3, 1))  # 1g.6gb+me

    refused(ErrorKind.INSUFFICIENT_RESOURCES, lambda: backend.create_gpu_instance(2, 14, at(3, 1)))
    refused(ErrorKind.INVALID_ARGUMENT, lambda: backend.create_gpu_instance(2, 9, at(0, 4)))


@pytest.mark.parametrize(("gi_id", "kind"), [(2, ErrorKind.NOT_FOUND), (0, ErrorKind.NOT_FOUND)])
def test_destroy_unknown_gpu_instance_is_not_found(
    tmp_path: Path, gi_id: int, kind: ErrorKind
) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.create_gpu_instance(0, P1G, at(0, 1))

    refused(kind, lambda: backend.destroy_gpu_instance(0, gi_id))


def test_destroy_gpu_instance_with_cis_is_in_use(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = backend.create_gpu_instance(0, P2G, at(0, 2))
    ci = backend.create_compute_instance(0, gi.gi_id, C1)

    refused(ErrorKind.IN_USE, lambda: backend.destroy_gpu_instance(0, gi.gi_id))
    backend.destroy_compute_instance(0, gi.gi_id, ci.ci_id)
    backend.destroy_gpu_instance(0, gi.gi_id)
    assert backend.mig_state(0).instances == ()


# --- compute instances ---------------------------------------------------------------------------


def gi_of(backend: SimBackend, profile: int, placement: Placement) -> int:
    return backend.create_gpu_instance(0, profile, placement).gi_id


def test_three_1c_fit_in_a_3g_and_a_fourth_does_not(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P3G, at(0, 4))

    cis = [backend.create_compute_instance(0, gi, C1) for _ in range(3)]

    assert [(ci.ci_id, ci.profile_id, ci.slices, ci.start) for ci in cis] == [
        (0, C1, 1, 0),
        (1, C1, 1, 1),
        (2, C1, 1, 2),
    ]
    refused(ErrorKind.INSUFFICIENT_RESOURCES, lambda: backend.create_compute_instance(0, gi, C1))


def test_2c_and_1c_share_a_3g(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P3G, at(4, 4))

    two = backend.create_compute_instance(0, gi, C2)
    one = backend.create_compute_instance(0, gi, C1)

    assert (two.ci_id, two.slices, two.start) == (0, 2, 0)
    assert (one.ci_id, one.slices, one.start) == (1, 1, 2)
    refused(ErrorKind.INSUFFICIENT_RESOURCES, lambda: backend.create_compute_instance(0, gi, C1))


@pytest.mark.parametrize(
    ("gi_profile", "placement", "cis", "kind"),
    [
        (P3G, at(0, 4), [C3, C1], ErrorKind.INSUFFICIENT_RESOURCES),  # the full CI takes all
        (P3G, at(0, 4), [C2, C2], ErrorKind.INSUFFICIENT_RESOURCES),  # 2c.3g: at most 1
        (P3G, at(0, 4), [C1, C2], ErrorKind.INSUFFICIENT_RESOURCES),  # 2c must start aligned
        (P3G, at(0, 4), [C7], ErrorKind.NOT_SUPPORTED),  # a 7c profile, not in a 3g
        (P3G, at(0, 4), [C4], ErrorKind.NOT_SUPPORTED),
        (P1G, at(0, 1), [C2], ErrorKind.NOT_SUPPORTED),
        (P3G, at(0, 4), [9], ErrorKind.INVALID_ARGUMENT),  # past NVML's CI profile enum
        (P3G, at(0, 4), [-1], ErrorKind.INVALID_ARGUMENT),
        (P1G, at(0, 1), [C1, C1], ErrorKind.INSUFFICIENT_RESOURCES),
        (P4G, at(0, 4), [C2, C2, C1], ErrorKind.INSUFFICIENT_RESOURCES),
        (P4G, at(0, 4), [C1] * 4 + [C1], ErrorKind.INSUFFICIENT_RESOURCES),
        (P7G, at(0, 8), [C3, C3, C1, C1], ErrorKind.INSUFFICIENT_RESOURCES),
        (P7G, at(0, 8), [C4, C2, C1, C1], ErrorKind.INSUFFICIENT_RESOURCES),
        (P7G, at(0, 8), [C7, C1], ErrorKind.INSUFFICIENT_RESOURCES),
        (P7G, at(0, 8), [C2] * 3 + [C1], None),
        (P7G, at(0, 8), [C4, C2, C1], None),
        (P4G, at(0, 4), [C2, C1, C1], None),
        (P2G, at(2, 2), [C1, C1], None),
    ],
)
def test_compute_instance_rules(
    tmp_path: Path,
    gi_profile: int,
    placement: Placement,
    cis: list[int],
    kind: ErrorKind | None,
) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, gi_profile, placement)
    last = len(cis) - 1 if kind else len(cis)

    for ci in cis[:last]:
        backend.create_compute_instance(0, gi, ci)
    if kind:
        refused(kind, lambda: backend.create_compute_instance(0, gi, cis[-1]))

    state = backend.mig_state(0)
    assert [ci.profile_id for ci in state.instances[0].compute_instances] == cis[:last]
    assert layout_problems(A100, state.instances) == []


def test_cis_in_a_7g_are_placed_aligned(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P7G, at(0, 8))

    placed = [backend.create_compute_instance(0, gi, c) for c in (C2, C3, C1, C1)]

    # The 3c cannot start at 2 (not aligned); the 1c fill the gap, then the end.
    assert [(ci.slices, ci.start) for ci in placed] == [(2, 0), (3, 3), (1, 2), (1, 6)]
    refused(ErrorKind.INSUFFICIENT_RESOURCES, lambda: backend.create_compute_instance(0, gi, C1))


def test_ci_ids_are_the_lowest_free(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P7G, at(0, 8))
    for _ in range(3):
        backend.create_compute_instance(0, gi, C1)

    backend.destroy_compute_instance(0, gi, 1)
    again = backend.create_compute_instance(0, gi, C2)

    assert (again.ci_id, again.start) == (1, 4)
    ids = [ci.ci_id for ci in backend.mig_state(0).instances[0].compute_instances]
    assert ids == [0, 1, 2]


def test_create_ci_in_an_unknown_gi_is_not_found(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi_of(backend, P1G, at(0, 1))

    refused(ErrorKind.NOT_FOUND, lambda: backend.create_compute_instance(0, 5, C1))


def test_create_ci_without_mig_is_not_supported(tmp_path: Path) -> None:
    refused(
        ErrorKind.NOT_SUPPORTED, lambda: opened("t4x1", tmp_path).create_compute_instance(0, 1, 0)
    )
    refused(
        ErrorKind.NOT_SUPPORTED,
        lambda: opened("a100-40gb:1", tmp_path).create_compute_instance(0, 1, 0),
    )


@pytest.mark.parametrize(("gi_id", "ci_id"), [(1, 1), (2, 0)])
def test_destroy_unknown_compute_instance_is_not_found(
    tmp_path: Path, gi_id: int, ci_id: int
) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P1G, at(0, 1))
    backend.create_compute_instance(0, gi, C1)

    refused(ErrorKind.NOT_FOUND, lambda: backend.destroy_compute_instance(0, gi_id, ci_id))


def test_mig_uuids_are_unique_random_and_stable(tmp_path: Path) -> None:
    backend = mig_on("dgx-a100", tmp_path, 0, 1)
    uuids = []
    for index in (0, 1):
        for start in range(7):
            gi = backend.create_gpu_instance(index, P1G, at(start, 1))
            uuids.append(backend.create_compute_instance(index, gi.gi_id, C1).mig_uuid)

    assert all(MIG_UUID.fullmatch(uuid) for uuid in uuids)
    assert len(set(uuids)) == 14
    assert [reopened(backend, i) for i in (0, 1)] == [backend.mig_state(i) for i in (0, 1)]

    backend.destroy_compute_instance(0, 1, 0)
    again = backend.create_compute_instance(0, 1, C1)
    assert again.mig_uuid not in uuids  # a new MIG device, as a real driver makes


# --- processes -----------------------------------------------------------------------------------


def test_processes_are_listed_per_gpu(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:2", tmp_path)
    gi = gi_of(backend, P7G, at(0, 8))
    ci = backend.create_compute_instance(0, gi, C7)
    backend.set_faults(SimFaults(processes=((0, 10, ci.mig_uuid), (1, 11, None), (0, 12, None))))

    assert backend.processes(0) == (GpuProcess(10, ci.mig_uuid), GpuProcess(12, None))
    assert backend.processes(1) == (GpuProcess(11, None),)
    assert opened("a100-40gb:2", tmp_path).processes(1) == (GpuProcess(11, None),)


def test_no_processes_by_default(tmp_path: Path) -> None:
    assert opened("dgx-h100", tmp_path).processes(7) == ()


def test_a_process_on_a_mig_device_blocks_only_that_device(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P3G, at(0, 4))
    busy = backend.create_compute_instance(0, gi, C2)
    idle = backend.create_compute_instance(0, gi, C1)
    backend.set_faults(SimFaults(processes=((0, 99, busy.mig_uuid),)))

    error = refused(ErrorKind.IN_USE, lambda: backend.destroy_compute_instance(0, gi, busy.ci_id))
    assert busy.mig_uuid in str(error)
    backend.destroy_compute_instance(0, gi, idle.ci_id)
    other = gi_of(backend, P3G, at(4, 4))  # creating elsewhere is fine
    backend.destroy_gpu_instance(0, other)
    assert [ci.ci_id for ci in backend.mig_state(0).instances[0].compute_instances] == [0]


def test_a_process_on_the_whole_gpu_blocks_every_tear_down(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    full = gi_of(backend, P3G, at(0, 4))
    ci = backend.create_compute_instance(0, full, C3)
    empty = gi_of(backend, P1G, at(4, 1))
    backend.set_faults(SimFaults(processes=((0, 1, None),)))

    refused(ErrorKind.IN_USE, lambda: backend.destroy_compute_instance(0, full, ci.ci_id))
    refused(ErrorKind.IN_USE, lambda: backend.destroy_gpu_instance(0, empty))
    refused(ErrorKind.IN_USE, lambda: backend.reset_gpu(0))
    assert len(backend.mig_state(0).instances) == 2


# --- lost GPUs, lifecycle, bad indices -----------------------------------------------------------

MIG_CALLS: dict[str, Callable[[SimBackend, int], object]] = {
    "mig_state": lambda b, i: b.mig_state(i),
    "processes": lambda b, i: b.processes(i),
    "set_mig_mode": lambda b, i: b.set_mig_mode(i, False),
    "create_gpu_instance": lambda b, i: b.create_gpu_instance(i, P1G, at(1, 1)),
    "create_compute_instance": lambda b, i: b.create_compute_instance(i, 1, C1),
    "destroy_compute_instance": lambda b, i: b.destroy_compute_instance(i, 1, 0),
    "destroy_gpu_instance": lambda b, i: b.destroy_gpu_instance(i, 1),
}


@pytest.mark.parametrize("call", sorted(MIG_CALLS))
def test_a_lost_gpu_answers_mig_calls_with_gpu_is_lost(tmp_path: Path, call: str) -> None:
    backend = mig_on("a100-40gb:2", tmp_path)
    gi = gi_of(backend, P1G, at(0, 1))
    backend.create_compute_instance(0, gi, C1)
    before = backend.state_path.read_bytes()
    backend.inject_gpu_lost(0)

    refused(ErrorKind.GPU_IS_LOST, lambda: MIG_CALLS[call](backend, 0))
    MIG_CALLS["mig_state"](backend, 1)  # the other GPU still answers

    assert backend.reset_gpu(0) == ON  # a reset is the cure, and it clears the instances
    assert not backend.gpus()[0].lost
    assert backend.mig_state(0).instances == ()
    assert before != backend.state_path.read_bytes()


@pytest.mark.parametrize("call", sorted([*MIG_CALLS, "reset_gpu", "set_faults", "power_cycle"]))
def test_mig_calls_need_open(tmp_path: Path, call: str) -> None:
    calls: dict[str, Callable[[SimBackend, int], object]] = {
        **MIG_CALLS,
        "reset_gpu": lambda b, i: b.reset_gpu(i),
        "set_faults": lambda b, i: b.set_faults(SimFaults()),
        "power_cycle": lambda b, i: b.power_cycle(),
    }
    backend = SimBackend("a100-40gb:1", tmp_path)

    refused(ErrorKind.UNINITIALIZED, lambda: calls[call](backend, 0))
    refused(ErrorKind.UNINITIALIZED, lambda: backend.faults())


@pytest.mark.parametrize("call", sorted([*MIG_CALLS, "reset_gpu"]))
@pytest.mark.parametrize("index", [-1, 1])
def test_mig_calls_with_an_unknown_index(tmp_path: Path, call: str, index: int) -> None:
    calls = {**MIG_CALLS, "reset_gpu": lambda b, i: b.reset_gpu(i)}
    backend = opened("a100-40gb:1", tmp_path)

    error = refused(ErrorKind.INVALID_ARGUMENT, lambda: calls[call](backend, index))
    assert f"no GPU with index {index}" in str(error)


# --- persistence ---------------------------------------------------------------------------------


def test_every_mutation_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    backend = opened("a100-40gb:1", tmp_path)
    steps: list[Callable[[], object]] = [
        lambda: backend.set_mig_mode(0, True),
        lambda: backend.reset_gpu(0),
        lambda: backend.create_gpu_instance(0, P3G, at(4, 4)),
        lambda: backend.create_compute_instance(0, 1, C2),
        lambda: backend.create_compute_instance(0, 1, C1),
        lambda: backend.destroy_compute_instance(0, 1, 0),
        lambda: backend.create_gpu_instance(0, P2G, at(0, 2)),
        lambda: backend.destroy_compute_instance(0, 1, 1),
        lambda: backend.destroy_gpu_instance(0, 1),
    ]
    for step in steps:
        step()
        assert reopened(backend) == backend.mig_state(0)
    assert [gi.placement for gi in backend.mig_state(0).instances] == [at(0, 2)]


def test_state_survives_a_restart(tmp_path: Path) -> None:
    backend = mig_on("dgx-h100", tmp_path, 2, 5)
    gi = backend.create_gpu_instance(2, P4G, at(0, 4))
    backend.create_compute_instance(2, gi.gi_id, C2)
    backend.create_compute_instance(2, gi.gi_id, C2)
    backend.create_gpu_instance(5, P1G_ME, at(3, 1))
    backend.set_faults(SimFaults(fail_after=3))
    snapshot = [backend.mig_state(i) for i in range(8)], backend.gpus()
    backend.close()

    backend.open()
    assert ([backend.mig_state(i) for i in range(8)], backend.gpus()) == snapshot
    again = opened("dgx-h100", tmp_path)
    assert ([again.mig_state(i) for i in range(8)], again.gpus()) == snapshot
    assert again.faults() == SimFaults(fail_after=3)


def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.set_faults(SimFaults(fail_after=5, crash_after=5))

    def fail(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sim_backend, "write_atomic", fail)
    refused(ErrorKind.OPERATING_SYSTEM, lambda: backend.create_gpu_instance(0, P7G, at(0, 8)))

    assert backend.mig_state(0).instances == ()
    assert backend.faults() == SimFaults(fail_after=5, crash_after=5)


def test_version_1_state_is_migrated(tmp_path: Path) -> None:
    path = opened("a100-40gb:2", tmp_path).state_path
    document = json.loads(path.read_text())
    uuids = [gpu["uuid"] for gpu in document["gpus"]]
    old = {
        "version": 1,
        "spec": "a100-40gb:2",
        "gpus": [
            {"uuid": uuid, "mig_mode": {"current": "enabled", "pending": "enabled"}, "lost": False}
            for uuid in uuids
        ],
    }
    path.write_text(json.dumps(old))

    backend = opened("a100-40gb:2", tmp_path)
    assert [gpu.uuid for gpu in backend.gpus()] == uuids
    assert backend.mig_state(1).mode == ON
    assert backend.faults() == SimFaults()
    assert path.read_text() == json.dumps(old)  # reading alone rewrites nothing

    backend.create_gpu_instance(1, P7G, at(0, 8))
    assert json.loads(path.read_text())["version"] == 3


def a100_with_layout(tmp_path: Path) -> tuple[Path, dict]:
    backend = mig_on("a100-40gb:2", tmp_path)
    gi = gi_of(backend, P3G, at(0, 4))
    ci = backend.create_compute_instance(0, gi, C1)
    backend.set_faults(SimFaults(processes=((0, 5, ci.mig_uuid),)))
    return backend.state_path, json.loads(backend.state_path.read_text())


def break_layout(document: dict, change: str) -> dict:
    gpu = document["gpus"][0]
    gi = gpu["gpu_instances"][0]
    ci = gi["compute_instances"][0]
    if change == "overlapping GIs":
        gpu["gpu_instances"].append({**gi, "gi_id": 2, "compute_instances": []})
    elif change == "placement not offered":
        gi["placement"] = {"start": 2, "size": 4}
    elif change == "unknown GI profile":
        gi["profile_id"] = 1
    elif change == "GI on a GPU with MIG off":
        document["gpus"][1]["gpu_instances"] = [{**gi, "compute_instances": []}]
    elif change == "CI profile not in the GI":
        ci["profile_id"] = 4
    elif change == "CI outside its GI":
        ci["start"] = 3
    elif change == "CI without MIG UUID":
        ci["mig_uuid"] = "GPU-0"
    elif change == "gi_id not an int":
        gi["gi_id"] = "1"
    elif change == "instances not a list":
        gpu["gpu_instances"] = {}
    elif change == "duplicate MIG UUID":
        gi["compute_instances"].append({**ci, "ci_id": 1, "start": 1})
    elif change == "process on an unknown MIG device":
        document["faults"]["processes"][0]["mig_uuid"] = "MIG-" + ci["mig_uuid"][4:][::-1]
    elif change == "process on an unknown GPU":
        document["faults"]["processes"][0]["gpu"] = 2
    elif change == "negative fail_after":
        document["faults"]["fail_after"] = -1
    elif change == "crash_after 0":
        document["faults"]["crash_after"] = 0
    elif change == "fail_after true":
        document["faults"]["fail_after"] = True
    elif change == "faults missing":
        del document["faults"]
    else:
        raise AssertionError(change)
    return document


@pytest.mark.parametrize(
    "change",
    [
        "overlapping GIs",
        "placement not offered",
        "unknown GI profile",
        "GI on a GPU with MIG off",
        "CI profile not in the GI",
        "CI outside its GI",
        "CI without MIG UUID",
        "gi_id not an int",
        "instances not a list",
        "duplicate MIG UUID",
        "process on an unknown MIG device",
        "process on an unknown GPU",
        "negative fail_after",
        "crash_after 0",
        "fail_after true",
        "faults missing",
    ],
)
def test_impossible_mig_state_is_reported_and_left_alone(tmp_path: Path, change: str) -> None:
    path, document = a100_with_layout(tmp_path)
    data = json.dumps(break_layout(document, change)).encode()
    path.write_bytes(data)

    with pytest.raises(BackendUnavailable, match="Move it away") as caught:
        opened("a100-40gb:2", tmp_path)

    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert path.read_bytes() == data


# --- injected failures and crashes ---------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3])
def test_fail_after_k_fails_the_next_mutation_once(tmp_path: Path, k: int) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.set_faults(SimFaults(fail_after=k))
    for start in range(k):
        backend.create_gpu_instance(0, P1G, at(start, 1))
    before = backend.mig_state(0)

    error = refused(ErrorKind.UNKNOWN, lambda: backend.create_gpu_instance(0, P1G, at(6, 1)))

    assert "injected failure" in str(error)
    assert backend.mig_state(0) == before == reopened(backend)
    assert backend.faults() == SimFaults()  # consumed, on disk as well
    assert opened("a100-40gb:1", tmp_path).faults() == SimFaults()
    backend.create_gpu_instance(0, P1G, at(6, 1))


def test_fail_after_counts_only_successful_mutations(tmp_path: Path) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    backend.set_faults(SimFaults(fail_after=1))

    refused(ErrorKind.INVALID_ARGUMENT, lambda: backend.create_gpu_instance(0, P2G, at(6, 2)))
    backend.mig_state(0)
    backend.processes(0)
    assert backend.faults().fail_after == 1
    backend.create_gpu_instance(0, P2G, at(4, 2))
    refused(ErrorKind.UNKNOWN, lambda: backend.destroy_gpu_instance(0, 1))


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.set_mig_mode(0, True),
        lambda b: b.reset_gpu(0),
        lambda b: b.create_gpu_instance(0, P1G, at(0, 1)),
        lambda b: b.create_compute_instance(0, 1, C1),
        lambda b: b.destroy_compute_instance(0, 1, 0),
        lambda b: b.destroy_gpu_instance(0, 1),
    ],
)
def test_every_mutation_can_be_failed(tmp_path: Path, call: Callable[[SimBackend], object]) -> None:
    backend = mig_on("a100-40gb:1", tmp_path)
    gi = gi_of(backend, P7G, at(0, 8))
    backend.create_compute_instance(0, gi, C7)
    backend.set_faults(SimFaults(fail_after=0))
    before = backend.mig_state(0)

    refused(ErrorKind.UNKNOWN, lambda: call(backend))
    assert backend.mig_state(0) == before


def test_fail_after_armed_while_gpud_is_stopped(tmp_path: Path) -> None:
    write_faults(tmp_path, "h100-80gb:1", SimFaults(fail_after=1))

    backend = opened("h100-80gb:1", tmp_path)
    backend.set_mig_mode(0, True)
    refused(ErrorKind.UNKNOWN, lambda: backend.create_gpu_instance(0, P7G, at(0, 8)))


def test_fail_after_survives_a_restart(tmp_path: Path) -> None:
    backend = opened("h100-80gb:1", tmp_path)
    backend.set_faults(SimFaults(fail_after=2))
    backend.set_mig_mode(0, True)
    backend.close()

    again = opened("h100-80gb:1", tmp_path)
    assert again.faults() == SimFaults(fail_after=1)
    again.create_gpu_instance(0, P3G, at(0, 4))
    refused(ErrorKind.UNKNOWN, lambda: again.create_gpu_instance(0, P3G, at(4, 4)))


@pytest.mark.parametrize(
    "faults",
    [
        SimFaults(fail_after=-1),
        SimFaults(crash_after=0),
        SimFaults(crash_after=-2),
        SimFaults(fail_after=True),
        SimFaults(processes=((1, 10, None),)),
        SimFaults(processes=((0, 0, None),)),
        SimFaults(processes=((0, 10, "MIG-00000000-0000-0000-0000-000000000000"),)),
        SimFaults(processes=[(0, 10, None)]),  # type: ignore[arg-type]
        SimFaults(processes=((0, 10),)),  # type: ignore[arg-type]
    ],
)
def test_bad_faults_are_refused(tmp_path: Path, faults: SimFaults) -> None:
    backend = opened("a100-40gb:1", tmp_path)
    before = backend.state_path.read_bytes()

    refused(ErrorKind.INVALID_ARGUMENT, lambda: backend.set_faults(faults))
    assert backend.faults() == SimFaults()
    assert backend.state_path.read_bytes() == before


CRASHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from gpud.hw.sim.backend import SimBackend, SimFaults
    from gpud.hw.types import Placement

    backend = SimBackend("h100-80gb:1", Path(sys.argv[1]))
    backend.open()
    if sys.argv[2] == "arm":
        backend.set_faults(SimFaults(crash_after=2))
    backend.set_mig_mode(0, True)
    print("1", flush=True)
    backend.create_gpu_instance(0, 9, Placement(0, 4))
    print("2", flush=True)
    backend.create_gpu_instance(0, 9, Placement(4, 4))
    print("3", flush=True)
    """
)


@pytest.mark.parametrize("armed", ["in-process", "while-stopped"])
def test_crash_after_kills_right_after_the_kth_mutation_is_on_disk(
    tmp_path: Path, armed: str
) -> None:
    if armed == "while-stopped":
        write_faults(tmp_path, "h100-80gb:1", SimFaults(crash_after=2))

    died = subprocess.run(
        [sys.executable, "-c", CRASHER, str(tmp_path), "arm" if armed == "in-process" else "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert died.returncode == -signal.SIGKILL, died.stderr
    assert died.stdout.split() == ["1"]  # the 2nd mutation never returned
    backend = opened("h100-80gb:1", tmp_path)
    state = backend.mig_state(0)
    assert state.mode == ON
    assert [(gi.profile_id, gi.placement) for gi in state.instances] == [(P3G, at(0, 4))]
    assert backend.faults() == SimFaults()

    again = subprocess.run(
        [sys.executable, "-c", CRASHER, str(tmp_path), "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # No crash the second time: the fault went with the mutation that fired it. The script now
    # fails on its own (3g at 0:4 exists already), which is an ordinary error exit.
    assert again.returncode == 1
    assert "INSUFFICIENT_RESOURCES" in again.stderr


def test_crash_after_counts_down_and_keeps_fail_after_separate(tmp_path: Path) -> None:
    backend = opened("h100-80gb:1", tmp_path)
    backend.set_faults(SimFaults(fail_after=1, crash_after=5))

    backend.set_mig_mode(0, True)
    refused(ErrorKind.UNKNOWN, lambda: backend.create_gpu_instance(0, P1G, at(0, 1)))
    backend.create_gpu_instance(0, P1G, at(0, 1))

    assert backend.faults() == SimFaults(crash_after=3)
    assert opened("h100-80gb:1", tmp_path).faults() == SimFaults(crash_after=3)


# --- power cycle ---------------------------------------------------------------------------------


def test_power_cycle_is_a_reboot(tmp_path: Path) -> None:
    backend = mig_on("dgx-a100", tmp_path, 0)
    gi = gi_of(backend, P7G, at(0, 8))
    ci = backend.create_compute_instance(0, gi, C7)
    backend.set_mig_mode(1, True)
    backend.inject_gpu_lost(2)
    backend.set_faults(SimFaults(fail_after=4, processes=((0, 1, ci.mig_uuid), (3, 2, None))))
    uuids = [gpu.uuid for gpu in backend.gpus()]

    backend.power_cycle()

    assert [gpu.uuid for gpu in backend.gpus()] == uuids
    assert [gpu.mig for gpu in backend.gpus()] == [ON, ON, *[OFF] * 6]
    assert not any(gpu.lost for gpu in backend.gpus())
    assert all(backend.mig_state(i).instances == () for i in range(8))
    assert backend.processes(0) == backend.processes(3) == ()
    assert backend.faults() == SimFaults(fail_after=4)  # not a mutation, not counted
    assert opened("dgx-a100", tmp_path).gpus() == backend.gpus()


def test_power_cycle_of_a_stopped_machine(tmp_path: Path) -> None:
    backend = mig_on("a30x4", tmp_path, 1)
    gi = backend.create_gpu_instance(1, 0, at(0, 4))
    backend.create_compute_instance(1, gi.gi_id, 3)
    backend.set_mig_mode(2, True)
    uuids = [gpu.uuid for gpu in backend.gpus()]
    backend.close()

    power_cycle_state(tmp_path, "a30x4")

    again = opened("a30x4", tmp_path)
    assert [gpu.uuid for gpu in again.gpus()] == uuids
    assert [gpu.mig for gpu in again.gpus()] == [OFF, ON, ON, OFF]
    assert again.mig_state(1).instances == ()


# --- invariants under any sequence of calls ------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["gi", "gi", "ci", "ci", "dci", "dgi", "clear"]),
        st.integers(0, 15),
        st.integers(0, 15),
    ),
    max_size=40,
)
"""``(call, a, b)``: ``a`` and ``b`` pick a profile, placement or existing instance by index
(modulo what exists), or, past what exists, an ID that is not there."""


def check_invariants(family: Family, instances: tuple[GpuInstance, ...]) -> None:
    """The layout rules, checked here independently of the backend's own checker."""
    profiles = {p.profile_id: p for p in family.profiles}
    slices = [
        s
        for gi in instances
        for s in range(gi.placement.start, gi.placement.start + gi.placement.size)
    ]
    assert len(slices) == len(set(slices)), "GPU instances share memory slices"
    assert all(0 <= s < family.memory_slices for s in slices)
    counts = Counter(gi.profile_id for gi in instances)
    assert all(counts[p] <= profiles[p].max_count for p in counts)
    assert sum(profiles[gi.profile_id].slices for gi in instances) <= family.compute_slices
    ids = [gi.gi_id for gi in instances]
    assert ids == sorted(set(ids)) and all(1 <= i <= family.compute_slices for i in ids)
    for gi in instances:
        profile = profiles[gi.profile_id]
        assert gi.placement in profile.placements
        ci_max = {c.profile_id: c.max_count for c in profile.compute_profiles}
        used = [s for ci in gi.compute_instances for s in range(ci.start, ci.start + ci.slices)]
        assert len(used) == len(set(used)), "compute instances share compute slices"
        assert all(0 <= s < profile.slices for s in used), "a CI sticks out of its GI"
        ci_counts = Counter(ci.profile_id for ci in gi.compute_instances)
        assert all(ci_counts[c] <= ci_max[c] for c in ci_counts)
    uuids = [ci.mig_uuid for gi in instances for ci in gi.compute_instances]
    assert len(uuids) == len(set(uuids))
    assert layout_problems(family, instances) == []


def gi_fits(instances: tuple[GpuInstance, ...], profile: GiProfile, p: Placement) -> bool:
    count = sum(1 for gi in instances if gi.profile_id == profile.profile_id)
    return count < profile.max_count and not any(gi.placement.overlaps(p) for gi in instances)


def ci_fits(gi_profile: GiProfile, gi: GpuInstance, ci_profile: CiProfile) -> bool:
    """Whether one more CI fits: below its count and some start aligned to its size is free."""
    count = sum(1 for ci in gi.compute_instances if ci.profile_id == ci_profile.profile_id)
    used = {s for ci in gi.compute_instances for s in range(ci.start, ci.start + ci.slices)}
    size = ci_profile.slices
    free = any(
        used.isdisjoint(range(start, start + size))
        for start in range(0, gi_profile.slices - size + 1, size)
    )
    return count < ci_profile.max_count and free


def plan(
    backend: SimBackend, family: Family, op: str, a: int, b: int
) -> tuple[Callable[[], object], bool]:
    """One random call, and whether the rules say it must succeed."""
    instances = backend.mig_state(0).instances
    profiles = {p.profile_id: p for p in family.profiles}
    if op == "gi":
        profile = family.profiles[a % len(family.profiles)]
        placement = profile.placements[b % len(profile.placements)]
        return (
            lambda: backend.create_gpu_instance(0, profile.profile_id, placement),
            gi_fits(instances, profile, placement),
        )
    gi = instances[a % len(instances)] if instances and a < 12 else None
    gi_id = gi.gi_id if gi else 8 + a  # past any GI ID the driver hands out
    if op == "ci":
        if gi is None:
            return lambda: backend.create_compute_instance(0, gi_id, 0), False
        profile = profiles[gi.profile_id]
        ci_profile = profile.compute_profiles[b % len(profile.compute_profiles)]
        return (
            lambda: backend.create_compute_instance(0, gi_id, ci_profile.profile_id),
            ci_fits(profile, gi, ci_profile),
        )
    cis = gi.compute_instances if gi else ()
    if op == "dci":
        ci_id = cis[b % len(cis)].ci_id if cis and b < 12 else 8 + b
        return lambda: backend.destroy_compute_instance(0, gi_id, ci_id), bool(cis) and b < 12
    if op == "clear":

        def clear() -> None:
            for ci in cis:
                backend.destroy_compute_instance(0, gi_id, ci.ci_id)
            backend.destroy_gpu_instance(0, gi_id)

        return clear, gi is not None
    return lambda: backend.destroy_gpu_instance(0, gi_id), gi is not None and not cis


@settings(max_examples=150, deadline=None)
@given(spec=st.sampled_from(["a100-40gb:1", "h100-80gb:1", "a30:1"]), ops=OPS)
def test_any_sequence_of_calls_keeps_the_layout_valid(spec: str, ops: list) -> None:
    """Random create/destroy calls: each succeeds exactly when the rules say it may, a refused
    one changes nothing, and the layout always satisfies every invariant (also after reopen)."""
    with tempfile.TemporaryDirectory() as state_dir:
        backend = mig_on(spec, Path(state_dir))
        family = family_for(backend.gpus()[0].pci_device_id)
        assert family is not None
        for op, a, b in ops:
            before = backend.mig_state(0)
            call, expected = plan(backend, family, op, a, b)
            try:
                call()
            except HwError as error:
                assert error.kind in {
                    ErrorKind.INSUFFICIENT_RESOURCES,
                    ErrorKind.NOT_FOUND,
                    ErrorKind.IN_USE,
                }, str(error)
                assert not expected, (op, a, b, before.instances, str(error))
                assert backend.mig_state(0) == before, "a refused call changed something"
            else:
                assert expected, (op, a, b, before.instances)
            check_invariants(family, backend.mig_state(0).instances)
        assert reopened(backend) == backend.mig_state(0)
