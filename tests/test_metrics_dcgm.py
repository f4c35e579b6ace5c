"""dcgm-exporter's families from device rows, and gpud's own: names, HELP, TYPE, label names
and order, values, what is absent, MIG rows and pods (shared/reference/cluster-integration.md
§1.2-§1.5). The exposition is checked by prometheus_client's parser and by ``promtool``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpud.config.load import ConfigError, parse
from gpud.hw.sim.backend import SimBackend
from gpud.metrics.address import parse_listen
from gpud.metrics.dcgm import FIELDS_AFTER_XID, FIELDS_BEFORE_XID, dcgm_families, entities
from gpud.metrics.exposition import render
from gpud.metrics.own import own_families
from gpud.node.state import NodeState, XidRecord
from gpud.node.stats import NodeStats
from gpud.observe.pods import PodRef, holders
from gpud.observe.rows import DeviceRow, device_rows, read_all
from tests.support.metrics import lines
from tests.support.snapshot import all_of, snapshot

MIXED = "version: v1\ndevicePlugin:\n  migStrategy: mixed\n"
TIME_SLICED = """\
version: v1
sharing:
  timeSlicing:
    renameByDefault: true
    resources:
      - name: nvidia.com/gpu
        replicas: 4
"""
GPU_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName"]
DRIVER = "550.127.05"


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[dict[str, SimBackend]]:
    opened = {}
    for spec in ("dgx-a100", "dgx-h100"):
        backend = SimBackend(spec, tmp_path / spec)
        backend.open()
        opened[spec] = backend
    yield opened
    for backend in opened.values():
        backend.close()


def exposition(
    backend: SimBackend,
    state: NodeState,
    pods: dict[tuple[str, str], tuple[PodRef, ...]] | None = None,
    reads: int = 2,
) -> str:
    for _ in range(reads - 1):
        read_all(backend, state)  # rates and GPM ratios need a previous read
    rows = device_rows(state, read_all(backend, state), holders(state, pods or {}))
    return render(dcgm_families(rows, DRIVER, "node-1")).decode()


def names(text: str) -> list[str]:
    return list(dict.fromkeys(line.name for line in lines(text)))


def test_whole_gpus_have_every_default_counter_in_dcgm_exporters_form(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-h100"]
    state = snapshot(backend)
    text = exposition(backend, state)
    # Every default counter an H100 gives, in default-counters.csv order, with its HELP and TYPE.
    expected = [f.name for f in FIELDS_BEFORE_XID] + ["DCGM_FI_DEV_XID_ERRORS"]
    expected += [f.name for f in FIELDS_AFTER_XID]
    assert names(text) == expected
    assert "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n" in text
    assert "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n" in text
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text  # not renamed *_total
    for name in expected:
        rows = lines(text, name)
        assert [r.label["gpu"] for r in rows] == [str(i) for i in range(8)], name
    gpu0 = state.gpus[0]
    (util,) = [r for r in lines(text, "DCGM_FI_DEV_GPU_UTIL") if r.label["gpu"] == "0"]
    # The label order of dcgm-exporter's template, and its values.
    assert util.labels == (
        ("gpu", "0"),
        ("UUID", gpu0.uuid),
        ("pci_bus_id", gpu0.pci_bus_id),
        ("device", "nvidia0"),
        ("modelName", "NVIDIA H100 80GB HBM3"),
        ("hostname", "node-1"),
        ("DCGM_FI_DRIVER_VERSION", DRIVER),
    )
    assert gpu0.pci_bus_id.startswith("00000000:")
    # Integers as %d, doubles as %f.
    assert util.value.isdigit()
    (power,) = [r for r in lines(text, "DCGM_FI_DEV_POWER_USAGE") if r.label["gpu"] == "0"]
    assert len(power.value.split(".")[1]) == 6
    (xid,) = [r for r in lines(text, "DCGM_FI_DEV_XID_ERRORS") if r.label["gpu"] == "0"]
    assert xid.labels[-2:] == (("err_code", "0"), ("err_msg", "No Error")) and xid.value == "0"


def test_what_an_a100_or_a_first_read_cannot_give_is_absent_not_zero(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-a100"]
    text = exposition(backend, snapshot(backend))
    present = names(text)
    # No GPM before Hopper: the DCGM_FI_PROF_* ratios and PCIe rates are missing, not 0.
    assert not [n for n in present if n.startswith("DCGM_FI_PROF_")]
    assert "DCGM_FI_DEV_GPU_UTIL" in present and "DCGM_FI_DEV_FB_USED" in present

    h100 = backends["dgx-h100"]
    first = exposition(h100, snapshot(h100), reads=1)
    for rate in ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"):
        assert rate not in names(first), "a rate needs two reads"


def test_a_mig_gpu_is_one_row_per_gpu_instance_with_its_own_memory_and_the_parents_clocks(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-h100"]
    all_of(backend, 0, "1g.10gb")
    state = snapshot(backend, MIXED)
    migs = [d for d in state.devices if d.is_mig]
    pods = {("nvidia.com/mig-1g.10gb", migs[2].uuid): (PodRef("ml", "train-2", "main"),)}
    text = exposition(backend, state, pods)

    fb = [r for r in lines(text, "DCGM_FI_DEV_FB_USED") if r.label["gpu"] == "0"]
    assert [r.label["GPU_I_ID"] for r in fb] == [str(d.gi_id) for d in migs]
    assert {r.label["GPU_I_PROFILE"] for r in fb} == {"1g.10gb"}
    assert [k for k, _ in fb[0].labels] == [
        *GPU_LABELS,
        "GPU_I_PROFILE",
        "GPU_I_ID",
        "hostname",
        "DCGM_FI_DRIVER_VERSION",
    ]
    assert all(int(r.value) < 10 * 1024 for r in fb), "an instance's memory, not the GPU's"
    held = fb[2]
    assert held.labels[-3:] == (("container", "main"), ("namespace", "ml"), ("pod", "train-2"))
    # Utilization is not supported in MIG mode: absent for GPU 0, present for the others.
    assert [r.label["gpu"] for r in lines(text, "DCGM_FI_DEV_GPU_UTIL")] == [
        str(i) for i in range(1, 8)
    ]
    # The parent's clock on every instance row; GPM per instance.
    clocks = [r for r in lines(text, "DCGM_FI_DEV_SM_CLOCK") if r.label["gpu"] == "0"]
    assert len(clocks) == 7 and len({r.value for r in clocks}) == 1
    tensor = [r for r in lines(text, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE") if r.label["gpu"] == "0"]
    assert len(tensor) == 7
    # No row for the MIG GPU itself.
    assert all("GPU_I_ID" in r.label for r in lines(text) if r.label.get("gpu") == "0")


def test_every_pod_sharing_a_time_sliced_gpu_has_its_own_row(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-a100"]
    state = snapshot(backend, TIME_SLICED)
    gpu0 = state.gpus[0].uuid
    shared = "nvidia.com/gpu.shared"
    pods = {
        (shared, f"{gpu0}::0"): (PodRef("ml", "a", "main"),),
        (shared, f"{gpu0}::1"): (PodRef("ml", "b", "main"),),
        (shared, f"{gpu0}::3"): (PodRef("dev", "c", "nb"),),
    }
    text = exposition(backend, state, pods)
    rows = [r for r in lines(text, "DCGM_FI_DEV_FB_USED") if r.label["gpu"] == "0"]
    assert [(r.label["namespace"], r.label["pod"]) for r in rows] == [
        ("dev", "c"),
        ("ml", "a"),
        ("ml", "b"),
    ]
    assert len({r.value for r in rows}) == 1, "the same GPU's value on each pod's row"
    xid = [r for r in lines(text, "DCGM_FI_DEV_XID_ERRORS") if r.label["gpu"] == "0"]
    assert [k for k, _ in xid[0].labels][-5:] == [
        "container",
        "err_code",
        "err_msg",
        "namespace",
        "pod",
    ]
    others = [r for r in lines(text, "DCGM_FI_DEV_FB_USED") if r.label["gpu"] != "0"]
    assert len(others) == 7 and not any("pod" in r.label for r in others)


def test_the_last_xid_is_the_value_with_its_code_and_name(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-a100"]
    uuid = backend.gpus()[1].uuid
    state = snapshot(backend, last_xid={uuid: XidRecord(79, 10.0, True)})
    text = exposition(backend, state)
    (row,) = [r for r in lines(text, "DCGM_FI_DEV_XID_ERRORS") if r.label["gpu"] == "1"]
    assert row.value == "79"
    assert row.label["err_code"] == "79" and row.label["err_msg"] == "GPU has fallen off the bus"


def test_compute_instances_of_one_gpu_instance_are_one_row(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-a100"]
    all_of(backend, 0, "3g.20gb")
    state = snapshot(backend, MIXED)
    rows = [r for r in device_rows(state, read_all(backend, state), {}) if r.gi_id is not None]
    first = rows[0]
    # A second compute instance on the first GPU instance, held by another pod, with a later XID.
    sibling = dataclasses.replace(
        first,
        mig_uuid="MIG-second-ci",
        ci_id=1,
        pods=(PodRef("ml", "b", "c"),),
        last_xid=XidRecord(43, 5.0, False),
    )
    first = dataclasses.replace(
        first, pods=(PodRef("ml", "a", "c"),), last_xid=XidRecord(13, 1.0, False)
    )
    merged: list[DeviceRow] = [first, sibling, *rows[1:]]
    out = entities(merged)
    assert [e.gi_id for e in out] == [r.gi_id for r in rows]
    assert out[0].pods == (PodRef("ml", "a", "c"), PodRef("ml", "b", "c"))
    assert out[0].last_xid is not None and out[0].last_xid.xid == 43


def test_gpuds_own_series_follow_prometheus_naming(backends: dict[str, SimBackend]) -> None:
    backend = backends["dgx-a100"]
    state = snapshot(backend, unhealthy={backend.gpus()[2].uuid: "XID 48"})
    stats = NodeStats()
    counters = stats.resource("nvidia.com/gpu")
    counters.allocate_calls, counters.allocate_errors = 5, 1
    counters.registrations, counters.reregistrations = 2, 1
    stats.xid_seen(state.gpus[2].uuid, 48)
    stats.mig_applied("applied", 1.5, 14)
    stats.config_reloaded(False)
    text = render(own_families(state, stats.read())).decode()
    by_name = {
        (r.name, r.label.get("resource", r.label.get("result"))): r.value for r in lines(text)
    }
    assert by_name[("gpud_allocate_calls_total", "nvidia.com/gpu")] == "5"
    assert by_name[("gpud_allocate_errors_total", "nvidia.com/gpu")] == "1"
    assert by_name[("gpud_plugin_registrations_total", "nvidia.com/gpu")] == "2"
    assert by_name[("gpud_plugin_reregistrations_total", "nvidia.com/gpu")] == "1"
    assert by_name[("gpud_mig_applies_total", "applied")] == "1"
    assert float(by_name[("gpud_mig_apply_seconds_total", "applied")]) == 1.5
    assert by_name[("gpud_mig_apply_mutations_total", "applied")] == "14"
    assert by_name[("gpud_config_reloads_total", "failed")] == "1"
    healthy = {r.label["gpu"]: r.value for r in lines(text, "gpud_device_healthy")}
    assert healthy == {str(i): "0" if i == 2 else "1" for i in range(8)}
    (xid,) = lines(text, "gpud_xid_events_total")
    assert xid.label == {"gpu": "2", "gpu_uuid": state.gpus[2].uuid, "xid": "48"}
    assert xid.value == "1"
    (build,) = lines(text, "gpud_build_info")
    assert build.label["backend"] == "sim" and build.label["driver_version"] == DRIVER


def test_the_exposition_parses_and_promtool_finds_only_dcgm_exporters_own_names(
    backends: dict[str, SimBackend],
) -> None:
    backend = backends["dgx-h100"]
    all_of(backend, 3, "1g.10gb")
    state = snapshot(backend, MIXED, last_xid={backend.gpus()[0].uuid: XidRecord(13, 1.0, False)})
    read_all(backend, state)
    rows = device_rows(state, read_all(backend, state), {})
    stats = NodeStats()
    stats.resource("nvidia.com/gpu").allocate_calls = 3
    stats.mig_applied("applied", 0.25, 7)
    families = [*dcgm_families(rows, DRIVER, "node-1"), *own_families(state, stats.read())]
    text = render(families).decode()

    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["DCGM_FI_DEV_FB_USED"].type == "gauge"
    assert len(parsed["DCGM_FI_DEV_FB_USED"].samples) == 7 + 7
    assert parsed["gpud_allocate_calls"].type == "counter"

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/setup installs Debian's prometheus package")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    problems = [p for p in (check.stdout + check.stderr).splitlines() if p.strip()]
    # The only hints are about dcgm-exporter's own names, which dashboards and alerts match and
    # so must stay: counters without _total, PCIE_REPLAY_COUNTER, the labels UUID and modelName.
    # gpud's own series have none.
    justified = (
        'counter metrics should have "_total" suffix',
        "metric name should not include type 'counter'",
        "label names should be written in 'snake_case' not 'camelCase'",
    )
    unjustified = [p for p in problems if not (p.startswith("DCGM_FI_") and p.endswith(justified))]
    assert unjustified == [], check.stdout + check.stderr
    assert any("_total" in p for p in problems), "promtool ran and saw dcgm-exporter's counters"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [(":9400", None, 9400), ("127.0.0.1:9400", "127.0.0.1", 9400), ("[::1]:9400", "::1", 9400)],
)
def test_listen_addresses_are_spelled_as_dcgm_exporters(
    text: str, host: str | None, port: int
) -> None:
    address = parse_listen(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text


@pytest.mark.parametrize(
    "text", ["9400", "::1:9400", "[::1:9400", "[nope]:9400", ":http", ":70000"]
)
def test_a_bad_listen_address_says_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_listen(text)
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse(f"version: v1\nmetrics:\n  listen: '{text}'\n")
