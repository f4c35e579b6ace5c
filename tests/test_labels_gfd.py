"""GPU Feature Discovery's labels as gpud computes them, against the reference's rules and examples.

Expected names and values are written from shared/reference/cluster-integration.md §2 (the label
table, §2.3's sanitising and suffixes, §2.4's strategies and their real examples) and from the
MIG profile tables of shared/reference/mig-profiles.md for the simulated boards, not read back
from the code. The simulated machines are real SimBackends partitioned through the MIG calls
NVML has, so the path from hardware facts to labels is the one the daemon takes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config.models import MigStrategy, Sharing
from gpud.hw.sim.backend import SimBackend
from gpud.labels.facts import label_inputs, read_machine_type, read_pci_classes, sysfs_address
from gpud.labels.gfd import (
    GpuFacts,
    LabelInputs,
    MigDeviceFacts,
    family,
    gfd_labels,
    sanitise,
)
from gpud.labels.names import key_problem
from gpud.labels.nfd import render
from gpud.labels.node import node_labels
from gpud.mig.catalog import family_for

NONE, SINGLE, MIXED = MigStrategy.NONE, MigStrategy.SINGLE, MigStrategy.MIXED
COMPUTE_CLASS = 0x030200  # PCI "3D controller", what data-center GPUs report
MACHINE = "PowerEdge XE9680"  # §2.2's example: labelled PowerEdge-XE9680


def sharing(
    resource: str, replicas: int, rename: str | None = None, by_default: bool = False
) -> Sharing:
    entry: dict[str, object] = {"name": resource, "replicas": replicas}
    if rename is not None:
        entry["rename"] = rename
    return Sharing.model_validate(
        {"timeSlicing": {"renameByDefault": by_default, "resources": [entry]}}
    )


def partition(backend: SimBackend, index: int, profiles: list[str]) -> None:
    """Turn MIG on for GPU ``index`` and create one full-GI MIG device per profile named."""
    mode = backend.set_mig_mode(index, True)
    if mode.pending is not mode.current:  # Ampere applies the mode at a reset
        backend.reset_gpu(index)
    for name in profiles:
        state = backend.mig_state(index)
        (profile,) = [p for p in state.profiles if p.name == name]
        taken = [gi.placement for gi in state.instances]
        placement = next(p for p in profile.placements if not any(p.overlaps(t) for t in taken))
        gi = backend.create_gpu_instance(index, profile.profile_id, placement)
        full = profile.full_ci
        assert full is not None
        backend.create_compute_instance(index, gi.gi_id, full.profile_id)


def node(
    tmp_path: Path,
    spec: str,
    strategy: MigStrategy,
    share: Sharing | None = None,
    layout: Mapping[int, list[str]] | None = None,
    mig_on_empty: tuple[int, ...] = (),
) -> dict[str, str]:
    """The labels of simulated machine ``spec`` with ``layout`` (GPU index -> profiles)."""
    backend = SimBackend(spec, tmp_path / spec.replace(":", "-"))
    backend.open()
    for index, profiles in (layout or {}).items():
        partition(backend, index, profiles)
    for index in mig_on_empty:
        partition(backend, index, [])
    gpus = backend.gpus()
    states = {g.index: backend.mig_state(g.index) for g in gpus if g.mig.capable}
    inputs = label_inputs(
        backend.system(),
        gpus,
        states,
        strategy,
        share or Sharing(),
        machine_type=MACHINE,
        pci_classes={g.pci_bus_id: COMPUTE_CLASS for g in gpus},
    )
    return dict(gfd_labels(inputs).labels)


def versions() -> dict[str, str]:
    """§2.2's version labels for the simulated driver 550.127.05 with CUDA 12.4."""
    return {
        "nvidia.com/cuda.driver-version.full": "550.127.05",
        "nvidia.com/cuda.driver-version.major": "550",
        "nvidia.com/cuda.driver-version.minor": "127",
        "nvidia.com/cuda.driver-version.revision": "05",
        "nvidia.com/cuda.driver.major": "550",
        "nvidia.com/cuda.driver.minor": "127",
        "nvidia.com/cuda.driver.rev": "05",
        "nvidia.com/cuda.runtime-version.full": "12.4",
        "nvidia.com/cuda.runtime-version.major": "12",
        "nvidia.com/cuda.runtime-version.minor": "4",
        "nvidia.com/cuda.runtime.major": "12",
        "nvidia.com/cuda.runtime.minor": "4",
    }


# The boards of the simulated machines: (product label, memory MiB, family, major, minor).
A100 = ("NVIDIA-A100-SXM4-40GB", "40960", "ampere", "8", "0")
# §2.2's own example row: NVIDIA-H100-80GB-HBM3, 81559, hopper, 9, 0.
H100 = ("NVIDIA-H100-80GB-HBM3", "81559", "hopper", "9", "0")
L4 = ("NVIDIA-L4", "23034", "ada-lovelace", "8", "9")
T4 = ("Tesla-T4", "15360", "turing", "7", "5")  # §2.2's example product


def whole(
    board: tuple[str, str, str, str, str],
    count: int,
    replicas: str = "1",
    strategy: str = "none",
    suffix: str = "",
    mig_capable: bool = True,
) -> dict[str, str]:
    product, memory, fam, major, minor = board
    return {
        **versions(),
        "nvidia.com/gpu.product": product + suffix,
        "nvidia.com/gpu.count": str(count),
        "nvidia.com/gpu.memory": memory,
        "nvidia.com/gpu.family": fam,
        "nvidia.com/gpu.compute.major": major,
        "nvidia.com/gpu.compute.minor": minor,
        "nvidia.com/gpu.replicas": replicas,
        "nvidia.com/gpu.sharing-strategy": strategy,
        "nvidia.com/gpu.machine": "PowerEdge-XE9680",
        "nvidia.com/gpu.mode": "compute",
        "nvidia.com/mig.capable": "true" if mig_capable else "false",
        "nvidia.com/mps.capable": "false",
    }


# MIG device facts from shared/reference/mig-profiles.md §2.1 (A100-SXM4-40GB 1g.5gb: 4864 MiB,
# 14 SMs, CE 1, DEC 0, JPEG 0, OFA 0) and §2.4 (H100 SXM5 1g.10gb: 9984 MiB, 16 SMs, CE 1,
# DEC 1, JPEG 1, OFA 0), as (profile, memory, SMs, copy, decoder, jpeg, ofa).
A100_1G = ("1g.5gb", "4864", "14", "1", "0", "0", "0")
H100_1G = ("1g.10gb", "9984", "16", "1", "1", "1", "0")
MACHINES = {"dgx-a100": (A100, A100_1G), "dgx-h100": (H100, H100_1G)}


def mig_attributes(prefix: str, facts: tuple[str, ...]) -> dict[str, str]:
    _, memory, sms, copy, decoder, jpeg, ofa = facts
    return {
        f"{prefix}.memory": memory,
        f"{prefix}.multiprocessors": sms,
        f"{prefix}.slices.gi": "1",
        f"{prefix}.slices.ci": "1",
        f"{prefix}.engines.copy": copy,
        f"{prefix}.engines.decoder": decoder,
        f"{prefix}.engines.jpeg": jpeg,
        f"{prefix}.engines.ofa": ofa,
    }


def all_1g(profile: str) -> dict[int, list[str]]:
    return {i: [profile] * 7 for i in range(8)}


# ---- whole GPUs: strategy none, time-slicing with and without rename ---------------------------


@pytest.mark.parametrize("spec", sorted(MACHINES))
def test_whole_gpus_under_none(tmp_path: Path, spec: str) -> None:
    board, _ = MACHINES[spec]
    # No nvidia.com/mig.strategy under none (§2.2), no gfd.timestamp (gpud never sets it).
    assert node(tmp_path, spec, NONE) == whole(board, 8)


@pytest.mark.parametrize("spec", sorted(MACHINES))
def test_time_slicing_without_rename_marks_the_product_shared(tmp_path: Path, spec: str) -> None:
    board, _ = MACHINES[spec]
    labels = node(tmp_path, spec, NONE, sharing("nvidia.com/gpu", 4))
    assert labels == whole(board, 8, replicas="4", strategy="time-slicing", suffix="-SHARED")


@pytest.mark.parametrize("spec", sorted(MACHINES))
@pytest.mark.parametrize(
    "share",
    [
        sharing("nvidia.com/gpu", 4, rename="nvidia.com/gpu.shared"),
        sharing("nvidia.com/gpu", 4, by_default=True),
    ],
    ids=["rename", "renameByDefault"],
)
def test_time_slicing_with_rename_keeps_the_product(
    tmp_path: Path, spec: str, share: Sharing
) -> None:
    # §2.3: -SHARED only when replicated AND not renamed.
    board, _ = MACHINES[spec]
    labels = node(tmp_path, spec, NONE, share)
    assert labels == whole(board, 8, replicas="4", strategy="time-slicing")


def test_time_slicing_of_another_resource_leaves_whole_gpus_alone(tmp_path: Path) -> None:
    labels = node(tmp_path, "dgx-a100", NONE, sharing("nvidia.com/mig-1g.5gb", 2))
    assert labels == whole(A100, 8)


@pytest.mark.parametrize(("spec", "board"), [("l4x2", L4), ("t4x1", T4)], ids=["l4x2", "t4x1"])
@pytest.mark.parametrize("strategy", [NONE, SINGLE, MIXED], ids=lambda s: s.value)
def test_boards_without_mig(
    tmp_path: Path, spec: str, board: tuple[str, str, str, str, str], strategy: MigStrategy
) -> None:
    count = 2 if spec == "l4x2" else 1
    expected = whole(board, count, mig_capable=False)
    if strategy is not NONE:
        expected["nvidia.com/mig.strategy"] = strategy.value
    assert node(tmp_path, spec, strategy) == expected


def test_time_sliced_t4(tmp_path: Path) -> None:
    labels = node(tmp_path, "t4x1", MIXED, sharing("nvidia.com/gpu", 8))
    assert labels["nvidia.com/gpu.product"] == "Tesla-T4-SHARED"
    assert labels["nvidia.com/gpu.replicas"] == "8"
    assert labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"


def test_none_with_every_gpu_in_mig_mode_shares_nothing_whole(tmp_path: Path) -> None:
    # A model whose every GPU has MIG on is labelled without sharing: replicas 0 (§2.4, mixed row;
    # GFD's full-GPU labels are the same under every strategy).
    labels = node(tmp_path, "dgx-a100", NONE, sharing("nvidia.com/gpu", 4), all_1g("1g.5gb"))
    assert labels == whole(A100, 8, replicas="0")


# ---- mixed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", sorted(MACHINES))
def test_mixed_labels_each_profile(tmp_path: Path, spec: str) -> None:
    board, mig = MACHINES[spec]
    profile = mig[0]
    labels = node(tmp_path, spec, MIXED, layout=all_1g(profile))
    prefix = f"nvidia.com/mig-{profile}"
    assert labels == {
        **whole(board, 8, replicas="0"),  # MIG-enabled GPUs: full-GPU labels without sharing
        "nvidia.com/mig.strategy": "mixed",
        f"{prefix}.product": f"{board[0]}-MIG-{profile}",
        f"{prefix}.count": "56",
        f"{prefix}.replicas": "1",
        f"{prefix}.sharing-strategy": "none",
        **mig_attributes(prefix, mig),
    }


@pytest.mark.parametrize("spec", sorted(MACHINES))
@pytest.mark.parametrize("renamed", [False, True], ids=["no-rename", "rename"])
def test_mixed_with_a_time_sliced_profile(tmp_path: Path, spec: str, renamed: bool) -> None:
    board, mig = MACHINES[spec]
    profile = mig[0]
    resource = f"nvidia.com/mig-{profile}"
    share = sharing(resource, 2, rename=f"{resource}.shared" if renamed else None)
    labels = node(tmp_path, spec, MIXED, share, all_1g(profile))
    assert labels[f"{resource}.product"] == f"{board[0]}-MIG-{profile}" + (
        "" if renamed else "-SHARED"
    )
    assert labels[f"{resource}.replicas"] == "2"
    assert labels[f"{resource}.sharing-strategy"] == "time-slicing"
    assert labels[f"{resource}.count"] == "56"  # devices, not replicas
    assert labels["nvidia.com/gpu.replicas"] == "0"


def test_mixed_with_whole_gpus_beside_mig_ones(tmp_path: Path) -> None:
    # Created lowest placement first: 2g at 0, the 1g at 2 and 3, the 3g at 4.
    layout = {0: ["2g.20gb", "1g.10gb", "1g.10gb", "3g.40gb"], 1: ["7g.80gb"]}
    labels = node(tmp_path, "dgx-h100", MIXED, sharing("nvidia.com/gpu", 2), layout)
    # Six GPUs are whole and shared: the model's labels take the full GPUs' sharing.
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    assert labels["nvidia.com/gpu.replicas"] == "2"
    counts = {k: v for k, v in labels.items() if k.endswith(".count") and "mig-" in k}
    assert counts == {
        "nvidia.com/mig-3g.40gb.count": "1",
        "nvidia.com/mig-2g.20gb.count": "1",
        "nvidia.com/mig-1g.10gb.count": "2",
        "nvidia.com/mig-7g.80gb.count": "1",
    }
    # §2.4 of mig-profiles.md: H100 SXM5 7g.80gb has 132 SMs, 8 CEs, 7 decoders.
    assert labels["nvidia.com/mig-7g.80gb.multiprocessors"] == "132"
    assert labels["nvidia.com/mig-7g.80gb.slices.gi"] == "7"
    assert labels["nvidia.com/mig-7g.80gb.engines.copy"] == "8"
    assert labels["nvidia.com/mig-7g.80gb.engines.decoder"] == "7"


def test_media_extension_profiles_take_a_dot(tmp_path: Path) -> None:
    # §2.3: "+" becomes "." (1g.10gb+me -> nvidia.com/mig-1g.10gb.me).
    labels = node(tmp_path, "dgx-h100", MIXED, layout={0: ["1g.10gb+me"]})
    assert labels["nvidia.com/mig-1g.10gb.me.product"] == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb.me"
    assert labels["nvidia.com/mig-1g.10gb.me.engines.ofa"] == "1"
    assert not any("+" in k for k in labels)


# ---- single ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", sorted(MACHINES))
def test_single_valid_describes_the_mig_device_as_the_gpu(tmp_path: Path, spec: str) -> None:
    board, mig = MACHINES[spec]
    profile = mig[0]
    labels = node(tmp_path, spec, SINGLE, layout=all_1g(profile))
    expected = whole(board, 8)
    # The MIG device overrides product, count, memory (MB) and adds its attributes; family and
    # compute capability stay the parent's (§2.4, single valid).
    expected |= {
        "nvidia.com/mig.strategy": "single",
        "nvidia.com/gpu.product": f"{board[0]}-MIG-{profile}",
        "nvidia.com/gpu.count": "56",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        **mig_attributes("nvidia.com/gpu", mig),
    }
    assert labels == expected


@pytest.mark.parametrize("spec", sorted(MACHINES))
@pytest.mark.parametrize("renamed", [False, True], ids=["no-rename", "rename"])
def test_single_time_sliced(tmp_path: Path, spec: str, renamed: bool) -> None:
    board, mig = MACHINES[spec]
    profile = mig[0]
    share = sharing("nvidia.com/gpu", 3, rename="nvidia.com/gpu.shared" if renamed else None)
    labels = node(tmp_path, spec, SINGLE, share, all_1g(profile))
    suffix = "" if renamed else "-SHARED"
    assert labels["nvidia.com/gpu.product"] == f"{board[0]}-MIG-{profile}{suffix}"
    assert labels["nvidia.com/gpu.replicas"] == "3"
    assert labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
    assert labels["nvidia.com/gpu.count"] == "56"


def test_single_without_any_mig_gpu_is_whole_gpus(tmp_path: Path) -> None:
    assert node(tmp_path, "dgx-h100", SINGLE) == {
        **whole(H100, 8),
        "nvidia.com/mig.strategy": "single",
    }


def invalid(board: tuple[str, str, str, str, str]) -> dict[str, str]:
    """§2.4, single invalid: product <model>-MIG-INVALID, count 0, replicas 0,
    sharing-strategy "", memory 0; the architecture labels stay."""
    return {
        **whole(board, 8),
        "nvidia.com/mig.strategy": "single",
        "nvidia.com/gpu.product": f"{board[0]}-MIG-INVALID",
        "nvidia.com/gpu.count": "0",
        "nvidia.com/gpu.replicas": "0",
        "nvidia.com/gpu.sharing-strategy": "",
        "nvidia.com/gpu.memory": "0",
    }


@pytest.mark.parametrize(
    ("layout", "empty"),
    [
        ({i: ["4g.40gb", "3g.40gb"] for i in range(8)}, ()),  # more than one profile
        ({0: ["1g.10gb"] * 7}, ()),  # MIG on and off mixed
        ({i: ["1g.10gb"] * 7 for i in range(7)}, (7,)),  # a MIG-enabled GPU with no devices
    ],
    ids=["two-profiles", "mig-on-and-off", "empty-mig-gpu"],
)
def test_single_invalid(
    tmp_path: Path, layout: dict[int, list[str]], empty: tuple[int, ...]
) -> None:
    backend_labels = node(tmp_path, "dgx-h100", SINGLE, layout=layout, mig_on_empty=empty)
    assert backend_labels == invalid(H100)


def test_single_invalid_says_why() -> None:
    gpu = GpuFacts(0, "NVIDIA A30", 24576, (8, 0), mig_capable=True, mig_enabled=True)
    result = gfd_labels(LabelInputs((gpu,), "550.127.05", "12.4", SINGLE))
    assert result.labels["nvidia.com/gpu.product"] == "NVIDIA-A30-MIG-INVALID"
    assert any("MIG enabled but no MIG devices" in w for w in result.warnings)


# ---- the reference's real examples, as pure inputs -------------------------------------------


def mig_gpu(
    index: int, name: str, device: MigDeviceFacts, count: int, cc: tuple[int, int]
) -> GpuFacts:
    return GpuFacts(
        index, name, 95830, cc, mig_capable=True, mig_enabled=True, mig_devices=(device,) * count
    )


def test_h100_nvl_single_example_from_dcgm_exporter_397() -> None:
    # §2.4: H100 NVL all-1g.12gb: gpu.product=NVIDIA-H100-NVL-MIG-1g.12gb, gpu.memory=11008,
    # gpu.multiprocessors=16; §2.2: slices.gi=1, slices.ci=1, decoder=1, encoder=0, jpeg=1, ofa=0.
    device = MigDeviceFacts("1g.12gb", 11008, 1, 1, 16, 1, 1, 0, 1, 0)
    gpu = mig_gpu(0, "NVIDIA H100 NVL", device, 7, (9, 0))
    labels = gfd_labels(LabelInputs((gpu,), "570.86.15", "12.8", SINGLE)).labels
    assert {k: v for k, v in labels.items() if k.startswith("nvidia.com/gpu.")} == {
        "nvidia.com/gpu.product": "NVIDIA-H100-NVL-MIG-1g.12gb",
        "nvidia.com/gpu.count": "7",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.memory": "11008",
        "nvidia.com/gpu.multiprocessors": "16",
        "nvidia.com/gpu.slices.gi": "1",
        "nvidia.com/gpu.slices.ci": "1",
        "nvidia.com/gpu.engines.copy": "1",
        "nvidia.com/gpu.engines.decoder": "1",
        "nvidia.com/gpu.engines.encoder": "0",
        "nvidia.com/gpu.engines.jpeg": "1",
        "nvidia.com/gpu.engines.ofa": "0",
        "nvidia.com/gpu.family": "hopper",
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/gpu.machine": "unknown",
        "nvidia.com/gpu.mode": "unknown",
    }
    # §2.2's version example: 570.86.15 and CUDA 12.8.
    assert labels["nvidia.com/cuda.driver-version.revision"] == "15"
    assert labels["nvidia.com/cuda.runtime-version.full"] == "12.8"


def test_a100_mixed_example_from_gpu_feature_discovery_7() -> None:
    # §2.4: A100-40GB 3g.20gb: memory=20096, multiprocessors=42, slices.gi=3, slices.ci=3,
    # engines.copy=3, engines.decoder=2.
    device = MigDeviceFacts("3g.20gb", 20096, 3, 3, 42, 3, 2, None, 0, 0)
    gpu = mig_gpu(0, "NVIDIA A100-PCIE-40GB", device, 2, (8, 0))
    labels = gfd_labels(LabelInputs((gpu,), "550.127.05", "12.4", MIXED)).labels
    prefix = "nvidia.com/mig-3g.20gb"
    assert labels[f"{prefix}.memory"] == "20096"
    assert labels[f"{prefix}.multiprocessors"] == "42"
    assert labels[f"{prefix}.slices.gi"] == "3"
    assert labels[f"{prefix}.slices.ci"] == "3"
    assert labels[f"{prefix}.engines.copy"] == "3"
    assert labels[f"{prefix}.engines.decoder"] == "2"
    assert labels[f"{prefix}.product"] == "NVIDIA-A100-PCIE-40GB-MIG-3g.20gb"
    assert labels[f"{prefix}.count"] == "2"
    # gpud does not know encoder counts for MIG devices: left out, not 0.
    assert f"{prefix}.engines.encoder" not in labels


def test_device_plugin_readme_example_of_a_shared_mig_product() -> None:
    # §2.3: "A100-SXM4-40GB-MIG-1g.5gb-SHARED" (an older driver's name without "NVIDIA ").
    device = MigDeviceFacts("1g.5gb", 4864, 1, 1)
    gpu = mig_gpu(0, "A100-SXM4-40GB", device, 7, (8, 0))
    share = sharing("nvidia.com/mig-1g.5gb", 2)
    labels = gfd_labels(LabelInputs((gpu,), "550.127.05", "12.4", MIXED, share)).labels
    assert labels["nvidia.com/mig-1g.5gb.product"] == "A100-SXM4-40GB-MIG-1g.5gb-SHARED"


def test_catalog_attributes_match_the_reference_examples() -> None:
    # H100 NVL (0x232110DE) 1g.12gb and A100-40GB (0x20B010DE) 3g.20gb, §2.2 / §2.4's examples.
    nvl = family_for(0x232110DE)
    a100 = family_for(0x20B010DE)
    assert nvl is not None and a100 is not None
    got = nvl.attributes("1g.12gb", 0x232110DE)
    assert (got.multiprocessors, got.copy_engines, got.decoders, got.jpeg_engines) == (16, 1, 1, 1)
    assert got.ofa_engines == 0
    got = a100.attributes("3g.20gb", 0x20B010DE)
    assert (got.multiprocessors, got.copy_engines, got.decoders) == (42, 3, 2)
    # H100 80GB: SXM5 and PCIe differ (mig-profiles.md §2.4); a board the reference does not
    # count (H800, 0x232410DE) gets no SM count rather than a neighbour's.
    h100 = family_for(0x233010DE)
    assert h100 is not None
    assert h100.attributes("3g.40gb", 0x233010DE).multiprocessors == 60
    assert h100.attributes("3g.40gb", 0x233110DE).multiprocessors == 46
    assert h100.attributes("3g.40gb", 0x232410DE).multiprocessors is None


def test_compute_instance_smaller_than_its_gpu_instance() -> None:
    # Under mixed it is not advertised (gpud.resources.sets), so it gets no mig-<profile>.*;
    # under single it is a device of its own profile, its SM count unknown (not proportional).
    part = MigDeviceFacts("1c.3g.20gb", 19968, 3, 1, None, 3, 2, None, 0, 0)
    gpu = mig_gpu(0, "NVIDIA A100-SXM4-40GB", part, 3, (8, 0))
    mixed = gfd_labels(LabelInputs((gpu,), "550.127.05", "12.4", MIXED)).labels
    assert not any(k.startswith("nvidia.com/mig-") for k in mixed)
    single = gfd_labels(LabelInputs((gpu,), "550.127.05", "12.4", SINGLE)).labels
    assert single["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1c.3g.20gb"
    assert single["nvidia.com/gpu.count"] == "3"
    assert single["nvidia.com/gpu.slices.ci"] == "1"
    assert "nvidia.com/gpu.multiprocessors" not in single


# ---- rules one by one ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "name"),
    [
        ((1, 3), "tesla"),
        ((2, 1), "fermi"),
        ((3, 5), "kepler"),
        ((5, 2), "maxwell"),
        ((6, 1), "pascal"),
        ((7, 0), "volta"),
        ((7, 2), "volta"),
        ((7, 5), "turing"),
        ((8, 0), "ampere"),
        ((8, 6), "ampere"),
        ((8, 9), "ada-lovelace"),
        ((9, 0), "hopper"),
        ((10, 0), "blackwell"),
        ((12, 0), "blackwell"),
        ((13, 0), "rubin"),
        ((4, 0), "undefined"),
        ((11, 0), "undefined"),
    ],
)
def test_family_table(capability: tuple[int, int], name: str) -> None:
    assert family(*capability) == name


def plain(
    *gpus: GpuFacts, driver: str = "550.127.05", machine_type: str | None = None
) -> dict[str, str]:
    inputs = LabelInputs(gpus, driver, "12.4", NONE, machine_type=machine_type)
    return dict(gfd_labels(inputs).labels)


def test_no_gpus_no_labels() -> None:
    assert gfd_labels(LabelInputs((), "550.127.05", "12.4", MIXED)).labels == {}


def test_unknown_compute_capability_and_memory_are_left_out() -> None:
    labels = plain(GpuFacts(0, "NVIDIA L4", 0, None), GpuFacts(1, "NVIDIA L4", 0, (0, 0)))
    assert not {"nvidia.com/gpu.memory", "nvidia.com/gpu.family"} & set(labels)
    assert not any(k.startswith("nvidia.com/gpu.compute.") for k in labels)


def test_driver_version_that_is_not_x_y_z_leaves_out_only_its_labels() -> None:
    gpu = GpuFacts(0, "NVIDIA L4", 23034, (8, 9))
    result = gfd_labels(LabelInputs((gpu,), "unknown", "", NONE))
    assert not any(k.startswith("nvidia.com/cuda.") for k in result.labels)
    assert result.labels["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert len(result.warnings) == 2
    # X.Y without a revision: revision "" (§2.2).
    labels = plain(gpu, driver="535.54")
    assert labels["nvidia.com/cuda.driver-version.revision"] == ""
    assert labels["nvidia.com/cuda.driver.rev"] == ""


def test_machine_type_is_sanitised_or_unknown() -> None:
    gpu = GpuFacts(0, "NVIDIA L4", 23034, (8, 9))
    assert (
        plain(gpu, machine_type="ProLiant DL380 Gen10 (P20174-B21)")["nvidia.com/gpu.machine"]
        == "ProLiant-DL380-Gen10-P20174-B21"
    )
    assert plain(gpu)["nvidia.com/gpu.machine"] == "unknown"


@pytest.mark.parametrize(
    ("classes", "mode"),
    [
        ((0x030200, 0x030200), "compute"),
        ((0x030000, 0x030000), "graphics"),
        ((0x030200, 0x030000), "unknown"),  # mixed classes
        ((0x030200, None), "unknown"),
        ((0x038000, 0x038000), "unknown"),
    ],
)
def test_gpu_mode_from_the_pci_class(classes: tuple[int | None, ...], mode: str) -> None:
    gpus = [GpuFacts(i, "NVIDIA L4", 23034, (8, 9), pci_class=c) for i, c in enumerate(classes)]
    assert plain(*gpus)["nvidia.com/gpu.mode"] == mode


def test_several_models_pick_one_deterministically_and_say_so() -> None:
    t4 = GpuFacts(0, "Tesla T4", 15360, (7, 5))
    l4s = [GpuFacts(i, "NVIDIA L4", 23034, (8, 9)) for i in (1, 2)]
    result = gfd_labels(LabelInputs((t4, *l4s), "550.127.05", "12.4", NONE))
    assert result.labels["nvidia.com/gpu.product"] == "NVIDIA-L4"  # the model with most GPUs
    assert result.labels["nvidia.com/gpu.count"] == "2"
    assert result.warnings == (
        "several GPU models on this node: nvidia.com/gpu.* describes NVIDIA L4 (2 GPUs), "
        "not Tesla T4",
    )
    # A tie goes to the model of the lowest GPU index.
    one_each = gfd_labels(LabelInputs((l4s[0], t4), "550.127.05", "12.4", NONE))
    assert one_each.labels["nvidia.com/gpu.product"] == "Tesla-T4"
    # A model with a GPU in MIG mode off wins over models whose GPUs all have MIG on, as GFD's
    # full-GPU labels override MIG-enabled ones.
    a100s = [GpuFacts(i, "NVIDIA A100-SXM4-40GB", 40960, (8, 0), True, True) for i in range(1, 4)]
    mixed_node = gfd_labels(LabelInputs((t4, *a100s), "550.127.05", "12.4", MIXED))
    assert mixed_node.labels["nvidia.com/gpu.product"] == "Tesla-T4"
    assert mixed_node.labels["nvidia.com/mig.capable"] == "true"


def test_static_labels_join_the_computed_ones() -> None:
    gpu = GpuFacts(0, "NVIDIA L4", 23034, (8, 9))
    inputs = LabelInputs((gpu,), "550.127.05", "12.4", NONE)
    both = node_labels(inputs, {"accelerator": "nvidia", "example.com/pool": "inference"})
    assert both.labels["accelerator"] == "nvidia"
    assert both.labels["nvidia.com/gpu.product"] == "NVIDIA-L4"
    # Without a driver there is nothing to compute, and the static labels still stand.
    assert node_labels(None, {"accelerator": "nvidia"}).labels == {"accelerator": "nvidia"}


# ---- sanitising and determinism (properties) -------------------------------------------------


def test_sanitise_examples() -> None:
    assert sanitise("NVIDIA GeForce RTX 4090") == "NVIDIA-GeForce-RTX-4090"  # §2.3's example
    assert sanitise("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert sanitise("  NVIDIA   RTX™ A6000 (rev. 2)\n") == "NVIDIA-RTX-A6000-rev.-2"


@given(st.text())
def test_sanitised_text_has_only_allowed_characters_and_is_stable(text: str) -> None:
    out = sanitise(text)
    assert re.fullmatch(r"[A-Za-z0-9\-_.]*", out)
    assert sanitise(out) == out
    # The rule restated: keep [A-Za-z0-9-_. ], then runs of spaces become one hyphen, none at the
    # ends.
    kept = "".join(c for c in text if c.isascii() and (c.isalnum() or c in "-_. "))
    assert out == re.sub(" +", "-", kept.strip(" "))


names = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=80)
profiles = st.sampled_from(["1g.5gb", "1g.10gb+me", "2g.20gb", "3g.40gb", "1c.3g.20gb", "7g.80gb"])


@st.composite
def gpu_sets(draw: st.DrawFn) -> tuple[GpuFacts, ...]:
    count = draw(st.integers(1, 6))
    models = draw(st.lists(names, min_size=1, max_size=3))
    out = []
    for index in range(count):
        enabled = draw(st.booleans())
        devices = tuple(
            MigDeviceFacts(p, draw(st.integers(1, 100000)), 7 if p.startswith("7") else 1, 1)
            for p in draw(st.lists(profiles, max_size=4))
        )
        out.append(
            GpuFacts(
                index,
                draw(st.sampled_from(models)),
                draw(st.integers(0, 200000)),
                draw(st.none() | st.tuples(st.integers(0, 14), st.integers(0, 9))),
                mig_capable=enabled or draw(st.booleans()),
                mig_enabled=enabled,
                mig_devices=devices if enabled else (),
                pci_class=draw(st.none() | st.sampled_from([0x030200, 0x030000])),
            )
        )
    return tuple(out)


@settings(max_examples=200, deadline=None)
@given(
    gpu_sets(),
    st.sampled_from(list(MigStrategy)),
    st.none() | names,
    st.randoms(use_true_random=False),
)
def test_any_node_gets_the_same_labels_in_any_order_and_loses_none_silently(
    gpus: tuple[GpuFacts, ...], strategy: MigStrategy, machine: str | None, rnd: object
) -> None:
    inputs = LabelInputs(gpus, "550.127.05", "12.4", strategy, machine_type=machine)
    result = gfd_labels(inputs)
    shuffled = list(gpus)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    again = gfd_labels(
        LabelInputs(tuple(shuffled), "550.127.05", "12.4", strategy, machine_type=machine)
    )
    assert again.labels == result.labels
    assert "nvidia.com/gfd.timestamp" not in result.labels
    # Names are always well-formed; a value NFD would refuse (a model name that sanitises to
    # nothing, an over-long product) is left out of the file with a reason, never dropped unsaid.
    assert all(key_problem(k) == "" for k in result.labels)
    file = render(result.labels)
    assert set(file.labels) | {r.name for r in file.rejected} == set(result.labels)
    assert all(r.reason for r in file.rejected)


# ---- host facts ------------------------------------------------------------------------------


def test_machine_type_file(tmp_path: Path) -> None:
    dmi = tmp_path / "product_name"
    dmi.write_text("DGXH100\n")
    assert read_machine_type(dmi) == "DGXH100"
    assert read_machine_type(tmp_path / "missing") is None


def test_pci_classes_from_sysfs(tmp_path: Path) -> None:
    assert sysfs_address("00000000:B7:00.0") == "0000:b7:00.0"
    (tmp_path / "0000:b7:00.0").mkdir()
    (tmp_path / "0000:b7:00.0/class").write_text("0x030200\n")
    (tmp_path / "0000:07:00.0").mkdir()
    (tmp_path / "0000:07:00.0/class").write_text("garbage\n")
    found = read_pci_classes(["00000000:B7:00.0", "00000000:07:00.0", "00000000:0F:00.0"], tmp_path)
    assert found == {"00000000:B7:00.0": 0x030200}
