"""Who holds which device, and one row per device: what ``/metrics`` and ``gpudctl top`` show.

Snapshots come from the simulated backend through the daemon's own derivations
(tests/support/snapshot.py); PodResources is a real gRPC server on a unix socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.hw.sim.backend import SimBackend
from gpud.k8s.podresources import PodResourcesUnavailable
from gpud.node.state import XidRecord
from gpud.observe.pods import PodRef, holders, list_pod_devices
from gpud.observe.rows import device_rows, read_all
from tests.support.podresources import FakePodResources, pod
from tests.support.snapshot import all_of, snapshot

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
MIG_1G = "nvidia.com/mig-1g.5gb"
TIME_SLICED = """\
version: v1
sharing:
  timeSlicing:
    renameByDefault: {rename}
    resources:
      - name: nvidia.com/gpu
        replicas: 4
"""
MIXED = "version: v1\ndevicePlugin:\n  migStrategy: mixed\n"


@pytest.fixture
def a100(tmp_path: Path) -> Iterator[SimBackend]:
    backend = SimBackend("dgx-a100", tmp_path / "sim")
    backend.open()
    try:
        yield backend
    finally:
        backend.close()


def ref(name: str, container: str = "main", namespace: str = "ml") -> PodRef:
    return PodRef(namespace, name, container)


def test_time_sliced_replicas_fold_onto_their_gpu_and_every_sharing_pod_is_kept(
    a100: SimBackend,
) -> None:
    state = snapshot(a100, TIME_SLICED.format(rename="false"))
    gpu0, gpu1 = state.gpus[0].uuid, state.gpus[1].uuid
    found = holders(
        state,
        {
            (GPU, f"{gpu0}::0"): (ref("a"),),
            (GPU, f"{gpu0}::3"): (ref("b"), ref("c", "side")),
            (GPU, f"{gpu1}::1"): (ref("d", namespace="dev"),),
        },
    )
    assert found == {
        gpu0: (ref("a"), ref("b"), ref("c", "side")),
        gpu1: (ref("d", namespace="dev"),),
    }


def test_renamed_shared_resources_are_attributed_and_names_gpud_does_not_serve_are_not(
    a100: SimBackend,
) -> None:
    state = snapshot(a100, TIME_SLICED.format(rename="true"))
    assert [rs.resource for rs in state.resources] == [SHARED]
    gpu0 = state.gpus[0].uuid
    found = holders(
        state,
        {
            (SHARED, f"{gpu0}::2"): (ref("shared"),),
            # gpud does not advertise nvidia.com/gpu here: another plugin's, not ours to report.
            (GPU, gpu0): (ref("other-plugin"),),
            ("example.com/fpga", gpu0): (ref("fpga"),),
        },
    )
    assert found == {gpu0: (ref("shared"),)}


def test_mig_devices_are_attributed_by_mig_uuid_and_unknown_ids_are_ignored(
    a100: SimBackend,
) -> None:
    all_of(a100, 0, "1g.5gb")
    state = snapshot(a100, MIXED)
    migs = [d.uuid for d in state.devices if d.is_mig]
    assert len(migs) == 7
    found = holders(
        state,
        {
            (MIG_1G, migs[0]): (ref("p0"),),
            (MIG_1G, migs[6]): (ref("p6"),),
            (MIG_1G, "MIG-00000000-0000-0000-0000-000000000000"): (ref("ghost"),),
        },
    )
    assert found == {migs[0]: (ref("p0"),), migs[6]: (ref("p6"),)}


def test_rows_are_one_per_whole_gpu_and_one_per_mig_device_in_order(a100: SimBackend) -> None:
    all_of(a100, 2, "1g.5gb")
    state = snapshot(a100, MIXED)
    readings = read_all(a100, state)
    migs = [d for d in state.devices if d.is_mig]
    rows = device_rows(state, readings, {migs[1].uuid: (ref("p"),)})
    assert [(r.gpu.index, r.gi_id) for r in rows] == (
        [(0, None), (1, None)] + [(2, d.gi_id) for d in migs] + [(i, None) for i in range(3, 8)]
    )
    assert [r.gi_id for r in rows if r.gpu.index == 2] == sorted(d.gi_id for d in migs)
    whole, mig = rows[0], rows[3]
    assert whole.mig_uuid is None and whole.profile is None and whole.instance is None
    assert whole.utilization_pct is not None and whole.memory_total_mib == 40960
    assert whole.temperature_c is not None and whole.power_w is not None
    assert mig.mig_uuid == migs[1].uuid and mig.profile == "1g.5gb" and mig.pods == (ref("p"),)
    assert mig.instance is not None and mig.instance.gi_id == mig.gi_id
    assert mig.memory_used_mib == mig.instance.fb_used_mib
    assert mig.memory_total_mib is not None and mig.memory_total_mib < 5 * 1024
    # An A100 has no GPM: a MIG device's utilization is unknown, not 0.
    assert mig.utilization_pct is None
    # Clocks, temperature and power are the parent's on every MIG row.
    assert mig.reading is not None and mig.reading.uuid == state.gpus[2].uuid
    assert mig.temperature_c == mig.reading.gpu_temp_c is not None


def test_mig_utilization_is_the_graphics_engine_activity_where_gpm_exists(
    tmp_path: Path,
) -> None:
    backend = SimBackend("dgx-h100", tmp_path / "sim")
    backend.open()
    try:
        all_of(backend, 0, "1g.10gb")
        state = snapshot(backend, MIXED)
        read_all(backend, state)  # GPM ratios need two reads
        rows = device_rows(state, read_all(backend, state), {})
    finally:
        backend.close()
    mig = next(r for r in rows if r.mig_uuid is not None)
    assert mig.instance is not None and mig.instance.gr_engine_active_ratio is not None
    assert mig.utilization_pct == pytest.approx(mig.instance.gr_engine_active_ratio * 100)


def test_lost_withdrawn_and_unreadable_gpus_still_have_their_rows(a100: SimBackend) -> None:
    all_of(a100, 1, "1g.5gb")
    a100.inject_gpu_lost(3)
    xid = XidRecord(79, 1.0, True, "fell off the bus")
    state = snapshot(
        a100,
        MIXED,
        unhealthy={a100.gpus()[3].uuid: "XID 79"},
        withdrawn=[a100.gpus()[1].uuid],
        last_xid={a100.gpus()[3].uuid: xid},
    )
    readings = read_all(a100, state)
    del readings[5]  # a GPU the backend could not read
    # The layout changes under the snapshot (an apply in progress): the old rows stay.
    for gi in a100.mig_state(1).instances:
        for ci in gi.compute_instances:
            a100.destroy_compute_instance(1, gi.gi_id, ci.ci_id)
        a100.destroy_gpu_instance(1, gi.gi_id)
    readings[1] = a100.read_telemetry(1)
    rows = device_rows(state, readings, {})
    by_gpu = {i: [r for r in rows if r.gpu.index == i] for i in range(8)}
    assert len(by_gpu[1]) == 7
    assert all(r.withdrawn and r.instance is None and r.memory_used_mib is None for r in by_gpu[1])
    (lost,) = by_gpu[3]
    assert not lost.healthy and lost.reason == "XID 79" and lost.last_xid == xid
    assert lost.reading is not None and lost.reading.lost and lost.temperature_c is None
    (unread,) = by_gpu[5]
    assert unread.reading is None and unread.healthy and unread.utilization_pct is None


def test_a_reading_of_another_gpu_at_that_index_is_not_shown(a100: SimBackend) -> None:
    state = snapshot(a100)
    reading = a100.read_telemetry(0)
    other = type(reading)(0, "GPU-somebody-else", gpu_util_pct=99)
    rows = device_rows(state, {0: other}, {})
    assert rows[0].reading is None and rows[0].utilization_pct is None


def test_pod_devices_come_from_kubelets_list_with_their_resource(short_tmp: Path) -> None:
    socket = short_tmp / "kubelet.sock"
    pods = [
        pod("ml", "train", main={GPU: ["GPU-a::0", "GPU-b::1"]}, side={GPU: ["GPU-a::0"]}),
        pod("dev", "nb", main={SHARED: ["GPU-a::1"]}),
    ]
    with FakePodResources(socket, pods):
        found = asyncio.run(list_pod_devices(socket, 5.0))
    assert found == {
        (GPU, "GPU-a::0"): (ref("train"), ref("train", "side")),
        (GPU, "GPU-b::1"): (ref("train"),),
        (SHARED, "GPU-a::1"): (ref("nb", namespace="dev"),),
    }


def test_an_absent_pod_resources_socket_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(PodResourcesUnavailable, match="does not exist"):
        asyncio.run(list_pod_devices(short_tmp / "missing.sock", 1.0))
