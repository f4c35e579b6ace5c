"""The simulated backend: catalog facts, spec parsing, persisted state and fault injection."""

from __future__ import annotations

import json
import re
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.hw.backend import Backend, FaultInjector
from gpud.hw.errors import BackendUnavailable, ErrorKind, HwError
from gpud.hw.sim import backend as sim_backend
from gpud.hw.sim.backend import SimBackend
from gpud.hw.sim.machines import MACHINES, MAX_GPUS, MODELS, parse_spec
from gpud.hw.types import MIG_UNSUPPORTED, EventKind, GpuInfo, HwEvent, MigMode, MigState

UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BUS_ID = re.compile(r"00000000:[0-9A-F]{2}:00\.0")
MIG_OFF = MigState(MigMode.DISABLED, MigMode.DISABLED)


def opened(spec: str, state_dir: Path) -> SimBackend:
    backend = SimBackend(spec, state_dir)
    backend.open()
    return backend


def gpus_of(spec: str, state_dir: Path) -> list[GpuInfo]:
    return opened(spec, state_dir).gpus()


def links(gpus: list[GpuInfo]) -> dict[tuple[int, int], int]:
    """NVLinks between every ordered pair of distinct GPUs, 0 where there are none."""
    return {
        (a.index, b.index): a.nvlinks_to(b.uuid) for a in gpus for b in gpus if a.index != b.index
    }


# --- catalog -------------------------------------------------------------------------------------


def test_dgx_a100_looks_like_a_dgx_a100(tmp_path: Path) -> None:
    gpus = gpus_of("dgx-a100", tmp_path)

    assert [gpu.index for gpu in gpus] == list(range(8))
    assert {gpu.name for gpu in gpus} == {"NVIDIA A100-SXM4-40GB"}
    assert {gpu.pci_device_id_hex for gpu in gpus} == {"0x20B010DE"}
    assert {gpu.memory_mib for gpu in gpus} == {40960}
    assert [gpu.numa_node for gpu in gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [gpu.pci_bus_id for gpu in gpus] == [
        "00000000:07:00.0",
        "00000000:0F:00.0",
        "00000000:47:00.0",
        "00000000:4E:00.0",
        "00000000:87:00.0",
        "00000000:90:00.0",
        "00000000:B7:00.0",
        "00000000:BD:00.0",
    ]
    assert [gpu.device_path for gpu in gpus] == [f"/dev/nvidia{i}" for i in range(8)]
    assert set(links(gpus).values()) == {12}
    assert all(len(gpu.nvlink_peers) == 7 for gpu in gpus)
    switch = [gpu.pcie_switch for gpu in gpus]
    assert None not in switch
    assert [switch[i] == switch[i + 1] for i in range(7)] == [
        True, False, True, False, True, False, True
    ]  # fmt: skip
    assert {gpu.mig for gpu in gpus} == {MIG_OFF}
    assert not any(gpu.lost for gpu in gpus)


def test_dgx_h100_has_nvswitch_with_18_links_per_peer(tmp_path: Path) -> None:
    gpus = gpus_of("dgx-h100", tmp_path)

    assert len(gpus) == 8
    assert {gpu.name for gpu in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert {gpu.pci_device_id for gpu in gpus} == {0x233010DE}
    assert {gpu.memory_mib for gpu in gpus} == {81559}
    assert [gpu.numa_node for gpu in gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [gpu.pci_bus_id[9:11] for gpu in gpus] == [
        "18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"
    ]  # fmt: skip
    assert set(links(gpus).values()) == {18}
    assert {gpu.mig for gpu in gpus} == {MIG_OFF}


def test_a30x4_is_two_bridged_pairs(tmp_path: Path) -> None:
    gpus = gpus_of("a30x4", tmp_path)

    assert {gpu.name for gpu in gpus} == {"NVIDIA A30"}
    assert {gpu.pci_device_id for gpu in gpus} == {0x20B710DE}
    assert {gpu.memory_mib for gpu in gpus} == {24576}
    assert [gpu.numa_node for gpu in gpus] == [0, 0, 1, 1]
    bridged = {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert links(gpus) == {pair: 4 if pair in bridged else 0 for pair in links(gpus)}
    assert {gpu.mig for gpu in gpus} == {MIG_OFF}


@pytest.mark.parametrize(
    ("spec", "name", "pci_device_id", "memory_mib", "count"),
    [
        ("l4x2", "NVIDIA L4", 0x27B810DE, 23034, 2),
        ("t4x1", "Tesla T4", 0x1EB810DE, 15360, 1),
    ],
)
def test_pcie_boards_without_mig_or_nvlink(
    tmp_path: Path, spec: str, name: str, pci_device_id: int, memory_mib: int, count: int
) -> None:
    gpus = gpus_of(spec, tmp_path)

    assert [(g.name, g.pci_device_id, g.memory_mib) for g in gpus] == [
        (name, pci_device_id, memory_mib)
    ] * count
    assert [gpu.numa_node for gpu in gpus] == [0] * count
    assert all(gpu.nvlink_peers == () for gpu in gpus)
    assert {gpu.mig for gpu in gpus} == {MIG_UNSUPPORTED}


@pytest.mark.parametrize(
    ("key", "name", "pci_device_id", "memory_mib", "mig", "capability"),
    [
        ("a100-40gb", "NVIDIA A100-SXM4-40GB", 0x20B010DE, 40960, True, (8, 0)),
        ("a100-80gb", "NVIDIA A100-SXM4-80GB", 0x20B210DE, 81920, True, (8, 0)),
        ("h100-80gb", "NVIDIA H100 80GB HBM3", 0x233010DE, 81559, True, (9, 0)),
        ("h200", "NVIDIA H200", 0x233510DE, 143771, True, (9, 0)),
        ("a30", "NVIDIA A30", 0x20B710DE, 24576, True, (8, 0)),
        ("l4", "NVIDIA L4", 0x27B810DE, 23034, False, (8, 9)),
        ("t4", "Tesla T4", 0x1EB810DE, 15360, False, (7, 5)),
    ],
)
def test_model_facts_are_what_nvml_reports(
    tmp_path: Path,
    key: str,
    name: str,
    pci_device_id: int,
    memory_mib: int,
    mig: bool,
    capability: tuple[int, int],
) -> None:
    model = MODELS[key]

    assert (model.product_name, model.pci_device_id, model.memory_mib) == (
        name,
        pci_device_id,
        memory_mib,
    )
    assert model.mig_capable is mig
    # nvmlDeviceGetCudaComputeCapability's answer, which the GPU family label comes from.
    assert {gpu.compute_capability for gpu in gpus_of(f"{key}:1", tmp_path)} == {capability}


def test_mig_families_name_entries_of_the_profile_reference() -> None:
    # The keys under `gpus:` in shared/reference/mig-profiles.yaml, where the MIG rules come from.
    families = {"A100-40GB", "A100-80GB", "A30-24GB", "H100-80GB", "H200-141GB"}

    assert {m.mig_family for m in MODELS.values() if m.mig_capable} <= families


def test_only_nvlink_boards_are_connected() -> None:
    for machine in MACHINES.values():
        for slot in machine.gpus:
            assert slot.model.nvlink or not slot.nvlink_peers, machine.spec


def test_model_count_spec_builds_an_nvswitch_machine(tmp_path: Path) -> None:
    gpus = gpus_of("h100-80gb:4", tmp_path)

    assert {gpu.name for gpu in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert [gpu.numa_node for gpu in gpus] == [0, 0, 1, 1]
    assert set(links(gpus).values()) == {18}


def test_model_count_spec_of_a_pcie_board_has_no_nvlink(tmp_path: Path) -> None:
    gpus = gpus_of("t4:3", tmp_path)

    assert [gpu.numa_node for gpu in gpus] == [0, 0, 1]
    assert set(links(gpus).values()) == {0}
    assert {gpu.pcie_switch for gpu in gpus} == {None}


def test_a_single_gpu_spec_sits_on_numa_node_0() -> None:
    assert [slot.numa_node for slot in parse_spec("l4:1").gpus] == [0]


def test_spec_is_canonicalised() -> None:
    assert parse_spec("  DGX-A100 ") is MACHINES["dgx-a100"]
    assert parse_spec("H100-80GB:04").spec == "h100-80gb:4"


@given(model=st.sampled_from(sorted(MODELS)), count=st.integers(1, MAX_GPUS))
def test_any_model_count_parses_to_count_plausible_gpus(model: str, count: int) -> None:
    machine = parse_spec(f"{model}:{count}")

    assert machine.spec == f"{model}:{count}"
    assert parse_spec(machine.spec) == machine
    assert len(machine.gpus) == count
    buses = [slot.pci_bus_id for slot in machine.gpus]
    assert all(BUS_ID.fullmatch(bus) for bus in buses)
    assert len(set(buses)) == count
    assert buses == sorted(buses)
    first_half = (count + 1) // 2
    assert [slot.numa_node for slot in machine.gpus] == [0] * first_half + [1] * (
        count - first_half
    )
    sxm = MODELS[model].nvswitch_links > 0
    for index, slot in enumerate(machine.gpus):
        expected = [(peer, MODELS[model].nvswitch_links) for peer in range(count) if peer != index]
        assert list(slot.nvlink_peers) == (expected if sxm else [])


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "dgx-z100",
        "v100:2",
        "dgx-a100:2",
        "h100-80gb",
        "h100-80gb:",
        ":4",
        "h100-80gb:0",
        "h100-80gb:00",
        f"h100-80gb:{MAX_GPUS + 1}",
        "h100-80gb:100000000000000000000000000000000000001",
        "h100-80gb:-1",
        "h100-80gb:x",
        "h100-80gb:4:1",
        "h100-80gb:٤",
    ],
)
def test_bad_spec_says_what_is_accepted(spec: str) -> None:
    with pytest.raises(ValueError, match="MODEL:COUNT") as caught:
        parse_spec(spec)

    message = str(caught.value)
    assert all(name in message for name in MACHINES)
    assert all(key in message for key in MODELS)
    assert f"1-{MAX_GPUS}" in message


def test_bad_spec_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GPU model 'v100'"):
        SimBackend("v100:2", tmp_path)
    assert not (tmp_path / "sim").exists()


# --- persisted state -----------------------------------------------------------------------------


def test_uuids_have_nvidias_form_and_are_unique(tmp_path: Path) -> None:
    uuids = [gpu.uuid for gpu in gpus_of("dgx-a100", tmp_path)]

    assert all(UUID.fullmatch(uuid) for uuid in uuids)
    assert len(set(uuids)) == 8


@settings(max_examples=25, deadline=None)
@given(model=st.sampled_from(sorted(MODELS)), count=st.integers(1, MAX_GPUS))
def test_any_machine_gets_unique_stable_uuids(model: str, count: int) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        first = gpus_of(f"{model}:{count}", Path(state_dir))
        again = gpus_of(f"{model}:{count}", Path(state_dir))

    assert len({gpu.uuid for gpu in first}) == count
    assert again == first


def test_uuids_survive_a_restart(tmp_path: Path) -> None:
    backend = opened("dgx-a100", tmp_path)
    before = backend.gpus()
    backend.close()

    assert gpus_of("dgx-a100", tmp_path) == before
    backend.open()
    assert backend.gpus() == before


def test_each_spec_keeps_its_own_uuids(tmp_path: Path) -> None:
    a100 = {gpu.uuid for gpu in gpus_of("dgx-a100", tmp_path)}
    generated = {gpu.uuid for gpu in gpus_of("a100-40gb:8", tmp_path)}

    assert a100.isdisjoint(generated)
    assert sorted(p.name for p in (tmp_path / "sim").iterdir()) == [
        "a100-40gb_8.json",
        "dgx-a100.json",
    ]
    assert {gpu.uuid for gpu in gpus_of("dgx-a100", tmp_path)} == a100


def test_state_file_is_versioned_json_and_leaves_no_temp_files(tmp_path: Path) -> None:
    backend = opened("t4:2", tmp_path)
    backend.inject_gpu_lost(1)

    document = json.loads(backend.state_path.read_text())
    loads = [gpu.pop("load") for gpu in document["gpus"]]
    assert document == {
        "version": 3,
        "spec": "t4:2",
        "gpus": [
            {
                "uuid": gpu.uuid,
                "mig_mode": {"current": "unsupported", "pending": "unsupported"},
                "lost": gpu.lost,
                "gpu_instances": [],
            }
            for gpu in backend.gpus()
        ],
        "faults": {"fail_after": None, "crash_after": None, "processes": []},
    }
    for load in loads:  # counters from when the machine was created, under the moving load
        assert load["checkpoint"]["energy_mj"] == load["checkpoint"]["activity"] == 0
        assert load["whole"] == {"utilization_pct": None, "memory_used_mib": None}
        assert load["instances"] == []
    assert [p.name for p in (tmp_path / "sim").iterdir()] == ["t4_2.json"]


def test_missing_state_dir_is_created(tmp_path: Path) -> None:
    backend = opened("l4x2", tmp_path / "not" / "yet")

    assert backend.state_path == tmp_path / "not" / "yet" / "sim" / "l4x2.json"
    assert backend.state_path.is_file()


def valid_state(tmp_path: Path, spec: str) -> tuple[Path, dict]:
    path = opened(spec, tmp_path).state_path
    return path, json.loads(path.read_text())


def corrupt(document: dict, change: str) -> object:
    gpus = document["gpus"]
    if change == "not json":
        return None
    if change == "a list":
        return [document]
    if change == "version 4":
        return {**document, "version": 4}
    if change == "version true":
        return {**document, "version": True}
    if change == "other spec":
        return {**document, "spec": "dgx-h100"}
    if change == "a GPU missing":
        return {**document, "gpus": gpus[:-1]}
    if change == "GPU not an object":
        return {**document, "gpus": [1, *gpus[1:]]}
    if change == "upper-case uuid":
        return {**document, "gpus": [{**gpus[0], "uuid": gpus[0]["uuid"].upper()}, *gpus[1:]]}
    if change == "duplicate uuid":
        return {**document, "gpus": [gpus[0], {**gpus[1], "uuid": gpus[0]["uuid"]}, *gpus[2:]]}
    if change == "lost not a bool":
        return {**document, "gpus": [{**gpus[0], "lost": "no"}, *gpus[1:]]}
    if change == "unknown MIG mode":
        return {**document, "gpus": [{**gpus[0], "mig_mode": {"current": "on"}}, *gpus[1:]]}
    if change == "MIG unsupported on an A100":
        unsupported = {"current": "unsupported", "pending": "unsupported"}
        return {**document, "gpus": [{**gpus[0], "mig_mode": unsupported}, *gpus[1:]]}
    raise AssertionError(change)


@pytest.mark.parametrize(
    "change",
    [
        "not json",
        "a list",
        "version 4",
        "version true",
        "other spec",
        "a GPU missing",
        "GPU not an object",
        "upper-case uuid",
        "duplicate uuid",
        "lost not a bool",
        "unknown MIG mode",
        "MIG unsupported on an A100",
    ],
)
def test_unusable_state_is_reported_and_left_alone(tmp_path: Path, change: str) -> None:
    path, document = valid_state(tmp_path, "a30x4")
    changed = corrupt(document, change)
    data = b"{ not json" if changed is None else json.dumps(changed).encode()
    path.write_bytes(data)

    with pytest.raises(BackendUnavailable) as caught:
        opened("a30x4", tmp_path)

    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert str(path) in str(caught.value)
    assert "Move it away" in str(caught.value)
    assert path.read_bytes() == data


def test_mig_mode_on_a_board_without_mig_is_refused(tmp_path: Path) -> None:
    path, document = valid_state(tmp_path, "t4x1")
    document["gpus"][0]["mig_mode"] = {"current": "disabled", "pending": "disabled"}
    path.write_text(json.dumps(document))

    with pytest.raises(BackendUnavailable, match="does not fit this board"):
        opened("t4x1", tmp_path)


def test_state_dir_that_is_a_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "sim").write_text("")

    with pytest.raises(BackendUnavailable) as caught:
        opened("t4x1", tmp_path)

    assert caught.value.kind is ErrorKind.OPERATING_SYSTEM
    assert f"cannot read simulated GPU state {tmp_path / 'sim' / 't4x1.json'}" in str(caught.value)


def test_state_that_cannot_be_created_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sim_backend, "write_atomic", refuse)

    with pytest.raises(BackendUnavailable, match="cannot write simulated GPU state") as caught:
        opened("t4x1", tmp_path)
    assert caught.value.kind is ErrorKind.NO_PERMISSION


# --- protocol and lifecycle ----------------------------------------------------------------------


def test_satisfies_backend_and_fault_injector(tmp_path: Path) -> None:
    backend = SimBackend("t4x1", tmp_path)

    assert isinstance(backend, Backend)
    assert isinstance(backend, FaultInjector)
    assert backend.name == "sim"


def test_system_reports_the_driver(tmp_path: Path) -> None:
    info = opened("t4x1", tmp_path).system()

    assert (info.backend, info.driver_version, info.cuda_version, info.nvml_version) == (
        "sim",
        "550.127.05",
        "12.4",
        "12.550.127.05",
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.system(),
        lambda b: b.gpus(),
        lambda b: b.start_events(print),
        lambda b: b.inject_xid(0, 79),
        lambda b: b.inject_gpu_lost(0),
        lambda b: b.reset_gpu(0),
    ],
)
def test_calls_need_open_like_nvml_init(tmp_path: Path, call) -> None:
    backend = SimBackend("t4x1", tmp_path)
    with pytest.raises(HwError) as before:
        call(backend)
    backend.open()
    backend.close()
    with pytest.raises(HwError) as after:
        call(backend)

    assert before.value.kind is after.value.kind is ErrorKind.UNINITIALIZED


# --- fault injection -----------------------------------------------------------------------------


def test_inject_xid_delivers_and_returns_the_event(tmp_path: Path) -> None:
    backend = opened("dgx-a100", tmp_path)
    received: list[HwEvent] = []
    backend.start_events(received.append)

    event = backend.inject_xid(3, 79)

    assert (event.kind, event.uuid, event.xid) == (EventKind.XID, backend.gpus()[3].uuid, 79)
    assert received == [event]


def test_inject_before_start_events_returns_the_event(tmp_path: Path) -> None:
    backend = opened("dgx-a100", tmp_path)

    assert backend.inject_xid(0, 48).xid == 48
    assert backend.inject_gpu_lost(1).kind is EventKind.GPU_LOST


def test_close_stops_delivery(tmp_path: Path) -> None:
    backend = opened("dgx-a100", tmp_path)
    received: list[HwEvent] = []
    backend.start_events(received.append)
    backend.close()
    backend.open()

    backend.inject_xid(0, 79)

    assert received == []


def test_gpu_lost_is_delivered_and_persists_across_restart(tmp_path: Path) -> None:
    backend = opened("dgx-a100", tmp_path)
    received: list[HwEvent] = []
    backend.start_events(received.append)

    event = backend.inject_gpu_lost(5)
    backend.close()
    gpus = gpus_of("dgx-a100", tmp_path)

    assert (event.kind, event.uuid) == (EventKind.GPU_LOST, gpus[5].uuid)
    assert received == [event]
    assert [gpu.lost for gpu in gpus] == [i == 5 for i in range(8)]


def test_a_lost_gpu_raises_no_xids_until_reset(tmp_path: Path) -> None:
    backend = opened("a30x4", tmp_path)
    backend.inject_gpu_lost(2)

    with pytest.raises(HwError) as caught:
        backend.inject_xid(2, 79)
    assert caught.value.kind is ErrorKind.GPU_IS_LOST

    backend.reset_gpu(2)
    assert not any(gpu.lost for gpu in gpus_of("a30x4", tmp_path))
    assert backend.inject_xid(2, 79).xid == 79


def test_losing_a_lost_gpu_again_still_reports_it(tmp_path: Path) -> None:
    backend = opened("t4x1", tmp_path)

    first = backend.inject_gpu_lost(0)
    written = backend.state_path.stat().st_ino
    second = backend.inject_gpu_lost(0)

    assert first == second
    assert backend.gpus()[0].lost
    assert backend.state_path.stat().st_ino == written  # nothing changed, nothing rewritten


def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = opened("t4x1", tmp_path)

    def fail(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sim_backend, "write_atomic", fail)
    with pytest.raises(HwError, match="No space left") as caught:
        backend.inject_gpu_lost(0)

    assert caught.value.kind is ErrorKind.OPERATING_SYSTEM
    assert not backend.gpus()[0].lost


@pytest.mark.parametrize(
    ("spec", "index", "known"),
    [("dgx-a100", 8, "GPUs 0-7"), ("dgx-a100", -1, "GPUs 0-7"), ("t4x1", 1, "GPU 0")],
)
@pytest.mark.parametrize("inject", ["xid", "lost", "reset"])
def test_unknown_index_is_an_invalid_argument(
    tmp_path: Path, spec: str, index: int, known: str, inject: str
) -> None:
    backend = opened(spec, tmp_path)
    calls = {
        "xid": lambda: backend.inject_xid(index, 79),
        "lost": lambda: backend.inject_gpu_lost(index),
        "reset": lambda: backend.reset_gpu(index),
    }

    with pytest.raises(HwError) as caught:
        calls[inject]()

    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert f"no GPU with index {index}; this machine has {known}" in str(caught.value)


@pytest.mark.parametrize("xid", [0, -79])
def test_xid_must_be_positive(tmp_path: Path, xid: int) -> None:
    backend = opened("t4x1", tmp_path)

    with pytest.raises(HwError, match="positive") as caught:
        backend.inject_xid(0, xid)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT


def test_injection_from_many_threads(tmp_path: Path) -> None:
    backend = opened("dgx-a100", tmp_path)
    received: list[HwEvent] = []
    backend.start_events(received.append)

    def hammer(index: int) -> None:
        for xid in range(1, 51):
            backend.inject_xid(index, xid)
        backend.inject_gpu_lost(index)

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(received) == 8 * 51
    assert all(gpu.lost for gpu in gpus_of("dgx-a100", tmp_path))
    for gpu in backend.gpus():
        mine = [event for event in received if event.uuid == gpu.uuid]
        assert [event.xid for event in mine] == [*range(1, 51), 0]
