"""MIG layout files: mig-parted's format read unchanged, strict errors, selection, export, and
the bundled layouts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.hw.types import MIG_UNSUPPORTED, MigLayoutState
from gpud.mig.catalog import families
from gpud.mig.fit import FitError, resolve
from gpud.mig.layout import (
    GpuTarget,
    LayoutError,
    LayoutNotFound,
    PciFilter,
    ProfileName,
    bundled,
    device_counts,
    export,
    load,
    parse,
    parse_profile,
    select,
)
from gpud.mig.model import catalog_state, simulate
from gpud.mig.planner import plan
from tests.conftest import shared_fixture, shared_reference

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "mig-parted-config-default.yaml"
EXAMPLES = "mig-parted-examples-config.yaml"

A100_40 = 0x20B010DE
A100_80 = 0x20B210DE
H100 = 0x233010DE
A30 = 0x20B710DE
DGX_A100 = [(i, A100_40) for i in range(8)]


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(LayoutError) as err:
        parse(text, "layouts.yaml")
    return err.value.problems


def target(**devices: int) -> GpuTarget:
    return GpuTarget(True, tuple(sorted((k.replace("_", "."), v) for k, v in devices.items())))


def built(pci: int, devices: dict[str, int], index: int = 0) -> MigLayoutState:
    """A GPU of catalog family ``pci`` carrying ``devices``, made the way gpud would make it."""
    blank = catalog_state(pci, index)
    resolved = resolve(GpuTarget(True, tuple(sorted(devices.items()))), blank)
    assert not isinstance(resolved, FitError), resolved
    return simulate(blank, plan(blank, resolved))


# ---- the ecosystem's files ----------------------------------------------------------------------


def test_mig_parted_files_load_unchanged() -> None:
    default = load(shared_fixture(DEFAULT))
    examples = load(shared_fixture(EXAMPLES))
    assert len(default.names) == 81
    assert examples.names == (
        "all-disabled",
        "all-enabled",
        "all-1g.5gb",
        "all-1g.5gb.me",
        "all-1g.10gb",
        "all-2g.10gb",
        "all-3g.20gb",
        "all-balanced",
        "custom-config",
    )
    # the odd spellings in NVIDIA's default file: Blackwell attributes, filters as string or list
    blackwell = select(default, "all-1g.24gb.me.all", DGX_A100)[0]
    assert blackwell == GpuTarget(True, (("1g.24gb+me.all", 1),))
    assert select(default, "all-1g.24gb-me", DGX_A100)[0] == GpuTarget(True, (("1g.24gb-me", 4),))
    assert select(default, "all-balanced", [(0, A30)]) == {
        0: GpuTarget(True, (("1g.6gb", 2), ("2g.12gb", 1)))
    }


@pytest.mark.parametrize("name", [DEFAULT, EXAMPLES], ids=["default", "examples"])
def test_all_1g_5gb_on_a_dgx_a100(name: str) -> None:
    path = shared_fixture(name)
    targets = select(load(path), "all-1g.5gb", DGX_A100)
    assert targets == {i: GpuTarget(True, (("1g.5gb", 7),)) for i in range(8)}
    for index, pci in DGX_A100:
        resolved = resolve(targets[index], catalog_state(pci, index))
        assert not isinstance(resolved, FitError)
        assert [r.profile.name for r in resolved.gis] == ["1g.5gb"] * 7


def test_custom_config_sets_each_gpu_by_index() -> None:
    targets = select(load(shared_fixture(EXAMPLES)), "custom-config", DGX_A100)
    off = GpuTarget(False)
    assert targets == {
        0: off,
        1: off,
        2: off,
        3: off,
        4: GpuTarget(True, (("1g.5gb", 7),)),
        5: GpuTarget(True, (("2g.10gb", 3),)),
        6: GpuTarget(True, (("3g.20gb", 2),)),
        7: GpuTarget(True, (("1g.5gb", 2), ("2g.10gb", 1), ("3g.20gb", 1))),
    }
    for index, pci in DGX_A100:
        assert not isinstance(resolve(targets[index], catalog_state(pci, index)), FitError)


def test_device_filter_picks_the_board_variant() -> None:
    default = load(shared_fixture(DEFAULT))
    # the same name means 4 on an A100-40GB and 7 on the 80GB boards
    assert select(default, "all-1g.10gb", DGX_A100) == {
        i: GpuTarget(True, (("1g.10gb", 4),)) for i in range(8)
    }
    mixed = [(0, A100_40), (1, H100), (2, A100_80), (3, A30)]
    assert select(default, "all-1g.10gb", mixed) == {
        0: GpuTarget(True, (("1g.10gb", 4),)),
        1: GpuTarget(True, (("1g.10gb", 7),)),
        2: GpuTarget(True, (("1g.10gb", 7),)),
    }  # the A30 matches no entry: left alone
    balanced = select(default, "all-balanced", mixed)
    assert balanced[0].devices == (("1g.5gb", 2), ("2g.10gb", 1), ("3g.20gb", 1))
    assert balanced[1].devices == (("1g.10gb", 2), ("2g.20gb", 1), ("3g.40gb", 1))
    assert balanced[2] == balanced[1]
    assert balanced[3].devices == (("1g.6gb", 2), ("2g.12gb", 1))


def test_later_entries_override_earlier_ones_and_filters_ignore_case() -> None:
    layouts = parse(
        "version: v1\nmig-configs:\n  mine:\n"
        "    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: 7}\n"
        "    - devices: [1, 3, 9]\n      mig-enabled: false\n"
        "    - devices: [3]\n      device-filter: 0x20b010de:0x134f10de\n"
        "      mig-enabled: true\n      mig-devices: {3g.20gb: 2, 1g.5gb: 0}\n"
        "    - devices: [2]\n      device-filter: [0x233010DE]\n"
        "      mig-enabled: true\n      mig-devices: {}\n"
    )
    entry = layouts.configs["mine"][2]
    assert entry.device_filter == (PciFilter(0x20B010DE, 0x134F10DE),)
    assert str(entry.device_filter[0]) == "0x20B010DE:0x134F10DE"
    assert select(layouts, "mine", DGX_A100[:4]) == {
        0: GpuTarget(True, (("1g.5gb", 7),)),
        1: GpuTarget(False),
        # the H100-only entry does not match an A100: entry 0 still holds
        2: GpuTarget(True, (("1g.5gb", 7),)),
        # subsystem part ignored (the backend reports none); zero counts dropped
        3: GpuTarget(True, (("3g.20gb", 2),)),
    }


def test_unknown_layout_name_lists_the_closest_first() -> None:
    layouts = parse(
        "version: v1\nmig-configs:\n"
        + "".join(
            f"  {n}:\n    - devices: all\n      mig-enabled: false\n"
            for n in ("zeta", "all-1g.5gb", "all-balanced", "all-1g.10gb")
        ),
        "mine.yaml",
    )
    with pytest.raises(LayoutNotFound) as err:
        select(layouts, "all-1g5gb", DGX_A100)
    message = str(err.value)
    assert message.startswith("mine.yaml: no layout named 'all-1g5gb'; available (closest first)")
    assert message.index("all-1g.5gb") < message.index("all-1g.10gb") < message.index("zeta")
    assert isinstance(err.value, LayoutError)


@pytest.mark.parametrize("text", ["", "# nothing\n", "version: v1\nmig-configs: {}\n"])
def test_a_file_without_layouts_is_an_error_not_an_empty_set(text: str) -> None:
    with pytest.raises(LayoutError, match="defines no layouts"):
        parse(text)


# ---- bounds -------------------------------------------------------------------------------------


def test_an_anchor_shared_by_two_layouts_is_fine() -> None:
    text = (
        "version: v1\nmig-configs:\n"
        "  a: &small\n    - devices: all\n      mig-enabled: true\n"
        "      mig-devices: {1g.5gb: 7}\n"
        "  b: *small\n"
    )
    config = parse(text)
    assert select(config, "a", DGX_A100) == select(config, "b", DGX_A100)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "a: &a [x, x]\n"
            + "".join(
                f"a{i}: &a{i} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for i, p in enumerate(["a", "a0", "a1", "a2", "a3", "a4"])
            ),
            "more than 20000 YAML nodes",
        ),
        ("a: &a [*a]\n", "alias *a is inside the node it names"),
        ("a: *b\n", "alias *b names no anchor before it"),
        ("a: &x 1\nb: &x 2\n", "line 2: anchor &x defined twice"),
        ("a: 1\n---\nb: 2\n", "line 2: a layout file holds one YAML document"),
        ("[" * 17 + "]" * 17, "line 1: nested deeper than 16 levels"),
        ("version: 2024-13-01\n", "line 1: cannot be read: month must be in 1..12"),
        ("#" * (256 * 1024 + 1), "262145 bytes is more than the 256 KiB"),
    ],
)
def test_input_over_a_bound_is_refused_before_it_is_built(text: str, says: str) -> None:
    with pytest.raises(LayoutError, match=re.escape(says)):
        parse(text)


def test_sixteen_levels_are_read() -> None:
    with pytest.raises(LayoutError, match="expected a mapping"):  # read, then found wrong
        parse("[" * 16 + "]" * 16)


# ---- bad files ----------------------------------------------------------------------------------

HEAD = "version: v1\nmig-configs:\n  custom-config:\n"
ON = "    - devices: all\n      mig-enabled: true\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mig-configs: {}\n", "version: required"),
        ("version: v2\nmig-configs: {}\n", "version: must be 'v1' (got 'v2')"),
        ("version: v1\n", "mig-configs: required"),
        ("version: v1\nmig-config: {}\n", "mig-config: unknown field (did you mean mig-configs?)"),
        ("version: v1\nmig-configs: [a]\n", "mig-configs: expected a mapping of layout names"),
        ("- version: v1\n", "(top level): expected a mapping"),
        ("version: [v1\n", "line 2, column 1: not valid YAML: "),
        ("version: v1\nmig-configs:\n  x: []\n", "mig-configs.x: must list at least one entry"),
        ("version: v1\nmig-configs:\n  x: {}\n", "mig-configs.x: expected a non-empty list"),
        (HEAD + "    - mig-enabled: false\n", "mig-configs.custom-config[0].devices: required"),
        (
            HEAD + "    - devices: some\n      mig-enabled: false\n",
            'mig-configs.custom-config[0].devices: expected "all" or a non-empty list',
        ),
        (
            HEAD + "    - devices: [0, -1]\n      mig-enabled: false\n",
            "mig-configs.custom-config[0].devices[1]: expected a GPU index",
        ),
        (
            HEAD + "    - devices: all\n",
            "mig-configs.custom-config[0].mig-enabled: required (true or false)",
        ),
        (
            HEAD + "    - devices: all\n      mig-enabled: maybe\n",
            "mig-configs.custom-config[0].mig-enabled: expected true or false, got 'maybe'",
        ),
        (
            HEAD + ON,
            "mig-configs.custom-config[0].mig-devices: required when mig-enabled is true",
        ),
        (
            HEAD + "    - devices: all\n      mig-enabled: false\n      mig-devices: {1g.5gb: 1}\n",
            "mig-configs.custom-config[0].mig-devices: must be empty or absent when mig-enabled "
            "is false",
        ),
        (
            HEAD + ON + "      mig-devices: {1g.5gb: 0}\n",
            "mig-configs.custom-config[0].mig-devices: at least one count must be > 0",
        ),
        (
            HEAD
            + (ON + "      mig-devices: {1g.5gb: 1}\n") * 2
            + ON
            + "      mig-devices: {1g.5gb: -1}\n",
            "mig-configs.custom-config[2].mig-devices.1g.5gb: count must be >= 0",
        ),
        (
            HEAD + ON + "      mig-devices: {1g.5gb: seven}\n",
            "mig-configs.custom-config[0].mig-devices.1g.5gb: count must be a whole number",
        ),
        (
            HEAD + ON + "      mig-devices: {1g5gb: 1}\n",
            "mig-configs.custom-config[0].mig-devices.1g5gb: not a MIG profile name",
        ),
        (
            HEAD + ON + "      mig-devices: {3c.2g.10gb: 1}\n",
            "mig-configs.custom-config[0].mig-devices.3c.2g.10gb: a compute instance of 3 slices "
            "cannot sit in a GPU instance of 2",
        ),
        (
            HEAD + ON + "      mig-devices: {1g.5gb+foo: 1}\n",
            "mig-configs.custom-config[0].mig-devices.1g.5gb+foo: not a MIG profile name",
        ),
        (
            HEAD + ON + "      mig-devices: {}\n      device-filter: 0x20B0\n",
            "mig-configs.custom-config[0].device-filter: '0x20B0' is not a PCI ID; expected "
            "0xDDDDVVVV",
        ),
        (
            HEAD + ON + "      mig-devices: {}\n      device-filter: [0x20B010DE, '42']\n",
            "mig-configs.custom-config[0].device-filter[1]: '42' is not a PCI ID",
        ),
        (
            HEAD + ON + "      mig-devices: {}\n      device-filter: []\n",
            "mig-configs.custom-config[0].device-filter: expected a PCI ID string or a non-empty",
        ),
        (
            HEAD + ON + "      mig-devcies: {}\n",
            "mig-configs.custom-config[0].mig-devcies: unknown field (did you mean mig-devices?)",
        ),
        (
            "version: v1\nmig-configs:\n  a:\n" + ON + "      mig-devices: {}\n"
            "  a:\n" + ON + "      mig-devices: {}\n",
            "line 7: duplicate key 'a'",
        ),
        (HEAD + "    - all\n", "mig-configs.custom-config[0]: expected a mapping with devices"),
    ],
)
def test_bad_files_name_each_problem_with_its_path(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        "version: v1\nextra: 1\nmig-configs:\n  a:\n"
        "    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: -2, 2g: 1}\n"
        "  b:\n    - devices: [x]\n      mig-enabled: false\n"
    )
    assert found == (
        "extra: unknown field (known: version, mig-configs)",
        "mig-configs.a[0].mig-devices.1g.5gb: count must be >= 0 (got -2)",
        "mig-configs.a[0].mig-devices.2g: not a MIG profile name; expected <G>g.<M>gb or "
        "<C>c.<G>g.<M>gb (e.g. 1g.5gb, 1c.2g.10gb), optionally followed by +me, +me.all, -me or "
        "+gfx",
        "mig-configs.b[0].devices[0]: expected a GPU index (an integer >= 0), got 'x'",
    )
    with pytest.raises(LayoutError) as err:
        parse("version: v2\nmig-configs: {}\n", "f.yaml")
    assert str(err.value) == "f.yaml: invalid MIG layout file:\n  version: must be 'v1' (got 'v2')"


def test_load_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="file does not exist"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "parsed", "canonical"),
    [
        ("1g.5gb", ProfileName(1, 5), "1g.5gb"),
        ("1c.2g.10gb", ProfileName(2, 10, "", 1), "1c.2g.10gb"),
        ("2c.2g.10gb", ProfileName(2, 10, "", 2), "2g.10gb"),
        ("1g.5gb+me", ProfileName(1, 5, "+me"), "1g.5gb+me"),
        ("1g.24gb+me.all", ProfileName(1, 24, "+me.all"), "1g.24gb+me.all"),
        ("1g.24gb-me", ProfileName(1, 24, "-me"), "1g.24gb-me"),
        ("4g.96gb+gfx", ProfileName(4, 96, "+gfx"), "4g.96gb+gfx"),
        ("1c.2g.12gb+me", ProfileName(2, 12, "+me", 1), "1c.2g.12gb+me"),
    ],
)
def test_profile_grammar(text: str, parsed: ProfileName, canonical: str) -> None:
    assert parse_profile(text) == parsed
    assert str(parsed) == canonical


@pytest.mark.parametrize("text", ["1g", "g.5gb", "0g.5gb", "1G.5GB", "1g.5gb+", "1g.5gb me", ""])
def test_profile_grammar_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a MIG profile name"):
        parse_profile(text)


# ---- export -------------------------------------------------------------------------------------


def test_export_round_trips_through_the_parser() -> None:
    states = [
        built(A100_40, {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}, 0),
        catalog_state(A100_40, 1, enabled=False),
        built(A100_40, {"1c.3g.20gb": 3, "3g.20gb": 1}, 2),
        catalog_state(A100_40, 3),  # MIG on, nothing created
        MigLayoutState(4, "GPU-t4", 0x1EB810DE, MIG_UNSUPPORTED, (), ()),
        built(H100, {"1g.10gb+me": 1, "1g.10gb": 6}, 5),
    ]
    text = export(states)
    assert text.startswith('version: v1\nmig-configs:\n  "current":\n    - devices: [0]\n')
    gpus = [(s.index, s.pci_device_id) for s in states]
    targets = select(parse(text), "current", gpus)
    assert targets == {
        0: GpuTarget(True, (("1g.5gb", 2), ("2g.10gb", 1), ("3g.20gb", 1))),
        1: GpuTarget(False),
        2: GpuTarget(True, (("1c.3g.20gb", 3), ("3g.20gb", 1))),
        3: GpuTarget(True),
        5: GpuTarget(True, (("1g.10gb", 6), ("1g.10gb+me", 1))),
    }  # the T4 cannot do MIG: not mentioned
    for state in states:
        if state.index in targets:
            resolved = resolve(targets[state.index], state)
            assert not isinstance(resolved, FitError)
            assert plan(state, resolved) == ()  # exported = already applied
    assert device_counts(states[2]) == (("1c.3g.20gb", 3), ("3g.20gb", 1))


def test_export_with_another_label_and_no_mig_gpus() -> None:
    text = export([MigLayoutState(0, "GPU-t4", 0x1EB810DE, MIG_UNSUPPORTED, (), ())], "node-a")
    assert select(parse(text), "node-a", [(0, 0x1EB810DE)]) == {0: GpuTarget(False)}
    with pytest.raises(ValueError, match="label"):
        export([], "")


# ---- bundled layouts ----------------------------------------------------------------------------


def test_bundled_layouts_are_what_the_generator_makes(tmp_path: Path) -> None:
    out = tmp_path / "layouts.yaml"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen-mig-layouts"), str(out)],
        check=True,
        capture_output=True,
    )
    committed = (ROOT / "gpud/mig/layouts.yaml").read_text()
    assert out.read_text() == committed, "run scripts/gen-mig-layouts and commit the result"


def test_the_catalog_is_what_the_generator_makes_of_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "catalog.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/gen-mig-catalog"),
            str(shared_reference("mig-profiles.yaml")),
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    committed = (ROOT / "gpud/mig/catalog.json").read_text()
    assert out.read_text() == committed, "run scripts/gen-mig-catalog and commit the result"


def test_bundled_layouts_fit_every_board_they_select() -> None:
    layouts = bundled()
    assert {"all-disabled", "all-enabled", "all-balanced", "all-1g.5gb", "all-7g.80gb"} <= set(
        layouts.names
    )
    node = [(i, f.pci_device_ids[0]) for i, f in enumerate(families().values())]
    for name in layouts.names:
        for index, target_ in select(layouts, name, node).items():
            resolved = resolve(target_, catalog_state(node[index][1], index))
            assert not isinstance(resolved, FitError), (name, resolved)
    # balanced on every family, filtered so each board gets its own profiles
    assert set(select(layouts, "all-balanced", node)) == set(range(len(node)))


def test_bundled_layouts_agree_with_mig_parted_where_both_define_a_name() -> None:
    ours, theirs = bundled(), load(shared_fixture(DEFAULT))
    compared = 0
    for family in families().values():
        gpu = [(0, family.pci_device_ids[0])]
        for name in set(ours.names) & set(theirs.names):
            mine, nvidia = select(ours, name, gpu), select(theirs, name, gpu)
            if mine and nvidia:
                assert mine == nvidia, (family.name, name)
                compared += 1
    assert compared > 40
