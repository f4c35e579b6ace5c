"""The fit check: layouts resolved to GI/CI profiles on one GPU, and why one cannot be built."""

from __future__ import annotations

import pytest

from gpud.hw.types import MIG_UNSUPPORTED, MigLayoutState, Placement
from gpud.mig.catalog import families
from gpud.mig.fit import FitError, ResolvedTarget, ci_starts, pack_cis, resolve
from gpud.mig.layout import GpuTarget
from gpud.mig.model import catalog_state

A100_40 = 0x20B010DE
A100_80 = 0x20B210DE
H100 = 0x233010DE
A30 = 0x20B710DE


def want(**devices: int) -> GpuTarget:
    """GpuTarget from keywords: ``_`` stands for ``.``, ``__`` for ``+`` (one_g__me -> 1g+me)."""
    names = {k.replace("__", "+").replace("_", "."): v for k, v in devices.items()}
    return GpuTarget(True, tuple(sorted(names.items())))


def ok(target: GpuTarget, pci: int = A100_40) -> ResolvedTarget:
    resolved = resolve(target, catalog_state(pci, 0, "GPU-test"))
    assert isinstance(resolved, ResolvedTarget), resolved
    return resolved


def error(target: GpuTarget, pci: int = A100_40) -> FitError:
    resolved = resolve(target, catalog_state(pci, 3, "GPU-test"))
    assert isinstance(resolved, FitError), resolved
    return resolved


def layout(devices: dict[str, int]) -> GpuTarget:
    return GpuTarget(True, tuple(sorted(devices.items())))


@pytest.mark.parametrize(
    ("devices", "pci", "reason"),
    [
        (
            {"3g.20gb": 2, "1g.5gb": 1},
            A100_40,
            "3g.20gb \u00d72 + 1g.5gb need 9 of 8 memory slices",
        ),
        (
            {"1g.5gb+me": 2},
            A100_40,
            "1g.5gb+me \u00d72: this GPU holds at most 1 GPU instance of 1g.5gb+me",
        ),
        (
            {"1g.5gb": 8},
            A100_40,
            "1g.5gb \u00d78: this GPU holds at most 7 GPU instances of 1g.5gb",
        ),
        (
            {"2g.10gb": 3, "1g.5gb": 2},
            A100_40,
            "2g.10gb \u00d73 + 1g.5gb \u00d72 need 8 of 8 memory slices, but their placements do "
            "not combine without overlap (allowed starts: 2g.10gb at 0,2,4; 1g.5gb at 0-6)",
        ),
        (
            {"7g.40gb": 1, "1g.5gb": 1},
            A100_40,
            "7g.40gb + 1g.5gb need 9 of 8 memory slices",
        ),
        (
            {"2g.12gb": 2, "1g.6gb": 1},
            A30,
            "2g.12gb \u00d72 + 1g.6gb need 5 of 4 memory slices",
        ),
        (
            {"1c.2g.10gb": 7},
            A100_40,
            "1c.2g.10gb \u00d77 need 4 GPU instances of 2g.10gb; this GPU holds at most 3 GPU "
            "instances of it",
        ),
        (
            {"3c.4g.20gb": 1},
            A100_40,
            "3c.4g.20gb: a 4g.20gb GPU instance offers 1c.4g.20gb, 2c.4g.20gb, 4g.20gb, "
            "not 3c.4g.20gb",
        ),
    ],
)
def test_why_a_layout_does_not_fit(devices: dict[str, int], pci: int, reason: str) -> None:
    err = error(layout(devices), pci)
    assert err.reasons == (reason,)
    assert not err.mig_unsupported


def test_a_profile_this_gpu_lacks_lists_the_ones_it_has() -> None:
    err = error(want(**{"1g.6gb": 4}))
    assert err.reasons == (
        "1g.6gb: not a profile of this GPU, which offers 1g.5gb, 1g.5gb+me, 1g.10gb, 2g.10gb, "
        "3g.20gb, 4g.20gb, 7g.40gb; 1g.6gb is a profile of A30-24GB",
    )
    assert str(err).startswith("GPU 3 (GPU-test, A100-40GB, PCI 0x20B010DE): 1g.6gb: not a")


def test_h100_names_on_an_a100_say_where_they_belong() -> None:
    err = error(layout({"3g.40gb": 1, "4g.40gb": 1}))
    assert len(err.reasons) == 2
    assert err.reasons[0].startswith("3g.40gb: not a profile of this GPU, which offers 1g.5gb")
    assert err.reasons[0].endswith("3g.40gb is a profile of A100-80GB, H100-80GB")
    assert err.reasons[1].startswith("4g.40gb: not a profile of this GPU")
    # the same name on the board it belongs to is fine
    assert ok(layout({"3g.40gb": 1, "4g.40gb": 1}), H100).enabled


def test_same_name_different_shape_is_resolved_per_board() -> None:
    # 1g.10gb: two memory slices on an A100-40GB (4 fit), one on an 80GB board (7 fit)
    small = ok(layout({"1g.10gb": 4}), A100_40)
    big = ok(layout({"1g.10gb": 7}), A100_80)
    assert {r.profile.memory_slices for r in small.gis} == {2}
    assert {r.profile.memory_slices for r in big.gis} == {1}
    assert error(layout({"1g.10gb": 5}), A100_40).reasons[0].startswith("1g.10gb \u00d75: this")


def test_a_gpu_without_mig() -> None:
    t4 = MigLayoutState(2, "GPU-t4", 0x1EB810DE, MIG_UNSUPPORTED, (), ())
    err = resolve(GpuTarget(True), t4)
    assert isinstance(err, FitError)
    assert err.mig_unsupported
    assert str(err) == "GPU 2 (GPU-t4, PCI 0x1EB810DE): MIG is not supported on this GPU"
    assert resolve(GpuTarget(False), t4) == ResolvedTarget(2, False)


def test_bad_names_and_counts_in_a_hand_made_target() -> None:
    err = error(GpuTarget(True, (("1g.5gb", -1), ("2g", 1))))
    assert err.reasons[0] == "1g.5gb: count must be >= 0 (got -1)"
    assert err.reasons[1].startswith("2g: not a MIG profile name")


def test_balanced_gets_a_real_arrangement() -> None:
    resolved = ok(layout({"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}))
    assert [
        (r.describe(), str(p)) for r, p in zip(resolved.gis, resolved.placements, strict=True)
    ] == [
        ("3g.20gb", "4:4"),
        ("2g.10gb", "0:2"),
        ("1g.5gb", "2:1"),
        ("1g.5gb", "3:1"),
    ]
    assert resolved.devices == (((9, 2), 1), ((14, 1), 1), ((19, 0), 2))


def test_worked_examples_from_the_reference_fit() -> None:
    # mig-profiles.md section 4, worked examples (A100-40GB)
    for devices in (
        {"3g.20gb": 1, "2g.10gb": 1, "1g.5gb": 2},
        {"2g.10gb": 1, "1g.5gb": 5},
        {"1g.5gb": 7},
        {"1g.10gb": 4},
        {"4g.20gb": 1, "3g.20gb": 1},
        {"4g.20gb": 1, "2g.10gb": 1, "1g.5gb": 1},
        {"2g.10gb": 3, "1g.5gb": 1},
        {"2g.10gb": 3, "1g.10gb": 1},
    ):
        ok(layout(devices))


def test_partial_cis_share_as_few_gpu_instances_as_hold_them() -> None:
    resolved = ok(layout({"1c.3g.20gb": 3, "1c.2g.10gb": 3, "1g.5gb": 0}))
    assert [r.describe() for r in resolved.gis] == [
        "3g.20gb [1c.3g.20gb \u00d73]",
        "2g.10gb [1c.2g.10gb]",
        "2g.10gb [1c.2g.10gb \u00d72]",
    ]
    # "1c.1g.5gb" is the whole 1g GI: the same device as "1g.5gb"
    assert ok(layout({"1c.1g.5gb": 2})).devices == ok(layout({"1g.5gb": 2})).devices
    # a 7g GI holds 4c + 2c + 1c together
    seven = ok(layout({"4c.7g.40gb": 1, "2c.7g.40gb": 1, "1c.7g.40gb": 1}))
    assert len(seven.gis) == 1
    assert [ci.name for ci in seven.gis[0].cis] == ["4c.7g.40gb", "2c.7g.40gb", "1c.7g.40gb"]


def test_ci_starts_are_aligned_and_order_matters() -> None:
    three = families()["A100-40GB"].profile("3g.20gb")
    assert three is not None
    one, two = three.compute_profiles[0], three.compute_profiles[1]
    assert ci_starts(three, [two, one]) == (0, 2)
    assert ci_starts(three, [one, two]) is None  # the 1c took slice 0, the 2c may only start there
    assert ci_starts(three, [one], taken=[(0, 2)]) == (2,)
    assert ci_starts(three, [one, one, one, one]) is None  # count: 3 per GI
    assert pack_cis(three, [one, one, one, one]) == ((one,), (one, one, one))
    assert pack_cis(three, [one, two, one]) == ((one,), (two, one))


@pytest.mark.parametrize("family", sorted(families()))
def test_every_profile_alone_fits_up_to_its_count(family: str) -> None:
    fam = families()[family]
    for profile in fam.profiles:
        resolved = ok(layout({profile.name: 1}), fam.pci_device_ids[0])
        assert resolved.placements[0] in profile.placements
        assert resolved.placements[0] != Placement(0, 0)
