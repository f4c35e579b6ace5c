"""The node's GPUs and MIG devices as DRA devices and ResourceSlices (pure parts).

Snapshots come from real simulated machines (tests/support/snapshot.py) partitioned through the
MIG calls, so the devices are what gpud would publish on that machine. What the API server and
the scheduler make of them is in tests/test_dra_slices.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.dra.devices import DraDevice, binary_quantity, dra_devices, pci_bus_id, semver
from gpud.dra.slices import Held, chunks, digest, plan, slice_specs
from gpud.hw.sim.backend import SimBackend
from gpud.node.state import XidRecord
from tests.support.snapshot import all_of, snapshot

DRIVER = "gpu.nvidia.com"


def machine(tmp_path: Path, spec: str = "dgx-a100") -> SimBackend:
    backend = SimBackend(spec, tmp_path / "sim")
    backend.open()
    return backend


def attrs(device: DraDevice) -> dict[str, object]:
    return {k: next(iter(v.values())) for k, v in device.attributes.items()}


@pytest.mark.parametrize(
    ("raw", "shaped"),
    [
        ("550.127.05", "550.127.5"),
        ("535.104.05", "535.104.5"),
        ("12.4", "12.4.0"),
        ("12", "12.0.0"),
        ("8.0", "8.0.0"),
        ("570.86.10", "570.86.10"),
        ("535.104.05.01", "535.104.5+01"),
        ("v1.2.3", "1.2.3"),
        ("", None),
        ("N/A", None),
        ("12.x", None),
    ],
)
def test_versions_become_the_strict_semver_the_api_server_accepts(raw: str, shaped: str) -> None:
    assert semver(raw) == shaped


def test_quantities_and_bus_ids() -> None:
    assert binary_quantity(40960) == "40Gi"
    assert binary_quantity(81559) == "81559Mi"
    assert binary_quantity(4864) == "4864Mi"
    assert binary_quantity(1 << 20) == "1Ti"
    assert pci_bus_id("00000000:BD:00.0") == "0000:bd:00.0"
    assert pci_bus_id("0000:07:00.0") == "0000:07:00.0"


def test_whole_gpus_carry_nvidias_names_attributes_and_capacity(tmp_path: Path) -> None:
    state = snapshot(machine(tmp_path))
    devices = dra_devices(state, DRIVER, {"0000:07:00.0": "pci0000:00"})
    assert [d.name for d in devices] == [f"gpu-{i}" for i in range(8)]
    first = devices[0]
    gpu = state.gpus[0]
    assert attrs(first) == {
        "type": "gpu",
        "uuid": gpu.uuid,
        "productName": "NVIDIA A100-SXM4-40GB",
        "architecture": "Ampere",
        "cudaComputeCapability": "8.0.0",
        "driverVersion": "550.127.5",
        "cudaDriverVersion": "12.4.0",
        "resource.kubernetes.io/pciBusID": "0000:07:00.0",
        "resource.kubernetes.io/pcieRoot": "pci0000:00",
        "resource.kubernetes.io/numaNode": 0,
    }
    assert first.capacity == {"memory": {"value": "40Gi"}}
    assert first.taints == ()
    # No root known for the others: the attribute is left out, not guessed.
    assert "resource.kubernetes.io/pcieRoot" not in devices[1].attributes
    assert attrs(devices[7])["resource.kubernetes.io/numaNode"] == 1


def test_a_gpu_with_mig_on_is_only_its_mig_devices(tmp_path: Path) -> None:
    backend = machine(tmp_path)
    all_of(backend, 0, "1g.5gb")
    all_of(backend, 1, "3g.20gb")
    state = snapshot(backend, "version: v1\ndevicePlugin:\n  migStrategy: none\n")
    devices = dra_devices(state, DRIVER)
    names = [d.name for d in devices]
    assert "gpu-0" not in names and "gpu-1" not in names
    assert names[:7] == [f"gpu-0-mig-1g5gb-19-{start}" for start in range(7)]
    assert names[7:9] == ["gpu-1-mig-3g20gb-9-0", "gpu-1-mig-3g20gb-9-4"]
    assert names[9:] == [f"gpu-{i}" for i in range(2, 8)]
    mig = devices[8]
    layout = state.mig_layout(1)
    assert layout is not None
    assert attrs(mig)["type"] == "mig"
    assert attrs(mig)["profile"] == "3g.20gb"
    assert attrs(mig)["parentUUID"] == state.gpus[1].uuid
    assert attrs(mig)["uuid"] == layout.instances[1].compute_instances[0].mig_uuid
    assert attrs(mig)["productName"] == "NVIDIA A100-SXM4-40GB"
    assert mig.capacity == {
        "memory": {"value": "19968Mi"},
        "memorySlice4": {"value": "1"},
        "memorySlice5": {"value": "1"},
        "memorySlice6": {"value": "1"},
        "memorySlice7": {"value": "1"},
    }
    # MIG strategy is the device plugin's business: DRA sees what exists either way.
    single = snapshot(backend, "version: v1\ndevicePlugin:\n  migStrategy: mixed\n")
    assert [d.name for d in dra_devices(single, DRIVER)] == names


def test_a_gpu_with_mig_on_and_no_instances_offers_nothing(tmp_path: Path) -> None:
    backend = machine(tmp_path, "a100-40gb:2")
    backend.set_mig_mode(0, True)
    backend.reset_gpu(0)
    assert [d.name for d in dra_devices(snapshot(backend), DRIVER)] == ["gpu-1"]


def test_partial_compute_instances_get_distinct_valid_names(tmp_path: Path) -> None:
    backend = machine(tmp_path, "a100-40gb:1")
    backend.set_mig_mode(0, True)
    backend.reset_gpu(0)
    profile = next(p for p in backend.mig_state(0).profiles if p.name == "3g.20gb")
    gi = backend.create_gpu_instance(0, profile.profile_id, profile.placements[0])
    partial = next(c for c in profile.compute_profiles if c.name == "1c.3g.20gb")
    for _ in range(3):
        backend.create_compute_instance(0, gi.gi_id, partial.profile_id)
    me = next(p for p in backend.mig_state(0).profiles if p.name == "1g.5gb+me")
    gi2 = backend.create_gpu_instance(0, me.profile_id, me.placements[-1])
    assert me.full_ci is not None
    backend.create_compute_instance(0, gi2.gi_id, me.full_ci.profile_id)
    names = [d.name for d in dra_devices(snapshot(backend), DRIVER)]
    assert names == [
        "gpu-0-mig-1c3g20gb-9-0-0",
        "gpu-0-mig-1c3g20gb-9-0-1",
        "gpu-0-mig-1c3g20gb-9-0-2",
        f"gpu-0-mig-1g5gbme-20-{me.placements[-1].start}",
    ]


def test_unhealthy_devices_are_tainted_and_withdrawn_gpus_left_out(tmp_path: Path) -> None:
    backend = machine(tmp_path, "a100-40gb:4")
    all_of(backend, 3, "1g.5gb")
    layouts = snapshot(backend).mig_layout(3)
    assert layouts is not None
    a_mig = layouts.instances[2].compute_instances[0].mig_uuid
    gpus = backend.gpus()
    state = snapshot(
        backend,
        unhealthy={
            gpus[0].uuid: "critical XID 79",
            gpus[1].uuid: "GPU lost: it fell off the bus; reset the GPU or reboot the node",
            a_mig: "critical XID 94 on GPU instance 5",
        },
        last_xid={gpus[0].uuid: XidRecord(79, 0.0, True)},
        withdrawn=[gpus[2].uuid],
    )
    devices = {d.name: d for d in dra_devices(state, "gpu.example.com")}
    assert [t.to_api() for t in devices["gpu-0"].taints] == [
        {"key": "gpu.example.com/xid", "value": "79", "effect": "NoSchedule"}
    ]
    assert [t.to_api() for t in devices["gpu-1"].taints] == [
        {"key": "gpu.example.com/gpu-lost", "effect": "NoSchedule"}
    ]
    assert "gpu-2" not in devices  # its MIG layout is being changed
    tainted = [name for name, d in devices.items() if d.taints]
    assert tainted == ["gpu-0", "gpu-1", "gpu-3-mig-1g5gb-19-2"]
    assert devices["gpu-3-mig-1g5gb-19-2"].to_api()["taints"] == [
        {"key": "gpu.example.com/xid", "value": "94", "effect": "NoSchedule"}
    ]


def test_slices_hold_at_most_128_devices_64_with_taints(tmp_path: Path) -> None:
    backend = machine(tmp_path, "a100-40gb:16")
    for index in range(16):
        all_of(backend, index, "1g.5gb")
    devices = dra_devices(snapshot(backend), DRIVER)
    assert len(devices) == 112
    specs = slice_specs(devices, DRIVER, "node-a")
    assert [len(s["devices"]) for s in specs] == [112]
    assert specs[0]["pool"] == {"name": "node-a", "generation": 0, "resourceSliceCount": 1}
    assert specs[0]["nodeName"] == "node-a" and specs[0]["driver"] == DRIVER

    sick = snapshot(backend, unhealthy={backend.gpus()[0].uuid: "critical XID 48"})
    devices = dra_devices(sick, DRIVER)
    assert [len(c) for c in chunks(devices)] == [64, 48]
    specs = slice_specs(devices, DRIVER, "node-a")
    assert [s["pool"]["resourceSliceCount"] for s in specs] == [2, 2]
    assert slice_specs((), DRIVER, "node-a") == []


def test_plan_writes_nothing_when_the_server_holds_the_pool(tmp_path: Path) -> None:
    specs = slice_specs(dra_devices(snapshot(machine(tmp_path)), DRIVER), DRIVER, "n")
    first = plan(specs, (), DRIVER, "n")
    assert first.generation == 1 and first.writes == 1 and len(first.creates) == 1
    created = first.creates[0]
    assert created["metadata"]["generateName"] == "n-gpu.nvidia.com-"
    assert created["spec"]["pool"]["generation"] == 1
    held = [Held("n-gpu.nvidia.com-abcde", 1, digest(specs[0]))]
    assert plan(specs, held, DRIVER, "n").writes == 0
    # Restarting gpud finds generation 7 there: unchanged, still nothing to send.
    assert plan(specs, [Held("x", 7, digest(specs[0]))], DRIVER, "n").writes == 0


def test_plan_rewrites_every_slice_with_a_new_generation_on_any_change(tmp_path: Path) -> None:
    backend = machine(tmp_path, "a100-40gb:16")
    for index in range(16):
        all_of(backend, index, "1g.5gb")
    sick = snapshot(backend, unhealthy={backend.gpus()[0].uuid: "critical XID 48"})
    specs = slice_specs(dra_devices(sick, DRIVER), DRIVER, "n")
    held = [Held("b", 4, digest(specs[1])), Held("a", 4, "stale")]
    changed = plan(specs, held, DRIVER, "n")
    assert changed.generation == 5
    assert changed.deletes == () and changed.creates == ()
    assert [name for name, _ in changed.updates] == ["a", "b"]
    assert {b["spec"]["pool"]["generation"] for _, b in changed.updates} == {5}
    # Healthy again: one slice; the other held one goes, first.
    healthy = slice_specs(dra_devices(snapshot(backend), DRIVER), DRIVER, "n")
    shrunk = plan(healthy, held, DRIVER, "n")
    assert shrunk.deletes == ("b",) and [n for n, _ in shrunk.updates] == ["a"]
    # A pool whose slices disagree on the generation is rewritten even when the content holds.
    mixed = [Held("a", 3, digest(specs[0])), Held("b", 4, digest(specs[1]))]
    assert plan(specs, mixed, DRIVER, "n").generation == 5
    # No devices left: every held slice is deleted.
    gone = plan([], held, DRIVER, "n")
    assert sorted(gone.deletes) == ["a", "b"] and not gone.updates and not gone.creates


def test_a_pool_emptied_and_refilled_goes_on_from_the_last_generation(tmp_path: Path) -> None:
    specs = slice_specs(dra_devices(snapshot(machine(tmp_path)), DRIVER), DRIVER, "n")
    assert plan(specs, (), DRIVER, "n", floor=2).generation == 3
    assert plan(specs, [Held("a", 5, "stale")], DRIVER, "n", floor=2).generation == 6


def test_pcie_roots_are_read_from_sysfs_links(tmp_path: Path) -> None:
    from gpud.dra.publish import read_pcie_roots

    devices = tmp_path / "bus" / "pci" / "devices"
    devices.mkdir(parents=True)
    real = tmp_path / "devices" / "pci0000:64" / "0000:64:01.0" / "0000:65:00.0"
    real.mkdir(parents=True)
    (devices / "0000:65:00.0").symlink_to(real)
    found = read_pcie_roots(["0000:65:00.0", "0000:07:00.0"], tmp_path)
    assert found == {"0000:65:00.0": "pci0000:64"}
