"""``gpudctl top`` through a running gpud: per GPU and MIG device the load the simulated hardware
shows and the pods kubelet's PodResources says hold it, as the issue's JSON contract has it."""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.cli.top import CLEAR, HIDE_CURSOR, SHOW_CURSOR
from tests.support.mignode import MigNode, start, stopped_after
from tests.support.podresources import pod

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"
MIG_1G = "nvidia.com/mig-1g.5gb"
KEYS = {
    "gpu",
    "uuid",
    "mig_uuid",
    "profile",
    "utilization",
    "memory_used_mib",
    "memory_total_mib",
    "temperature_c",
    "power_w",
    "health",
    "pods",
}


@pytest.fixture
def nodes(short_tmp: Path) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def top(node: MigNode, *args: str) -> dict[str, Any]:
    out = node.gpudctl("top", "--once", "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def holders(device: dict[str, Any]) -> list[str]:
    return [f"{p['namespace']}/{p['pod']}/{p['container']}" for p in device["pods"]]


def test_whole_gpus_show_the_load_and_the_pod_holding_each(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "dgx-a100")
    nodes.append(node)
    uuids = node.uuids()
    assert node.podres is not None
    node.podres.pods = [
        pod("ml", "train-0", main={GPU: [uuids[1]]}, sidecar={}),
        # Another vendor's device with a colliding ID is not a GPU of gpud's.
        pod("fpga", "job", main={"example.com/fpga": [uuids[2]]}),
    ]
    set_load = node.gpudctl(
        "debug", "set-load", "--gpu", "1", "--util", "80", "--memory-mib", "20000"
    )
    assert set_load.returncode == 0, set_load.stderr

    data = top(node)
    assert data["pods_error"] is None and data["backend_error"] is None
    devices = data["devices"]
    assert [d["gpu"] for d in devices] == list(range(8))
    assert all(set(d) == KEYS for d in devices)
    assert [d["uuid"] for d in devices] == uuids
    one = devices[1]
    assert (one["mig_uuid"], one["profile"], one["health"]) == (None, None, "Healthy")
    assert abs(one["utilization"] - 80) <= 2
    assert one["memory_used_mib"] == 20000
    assert one["memory_total_mib"] >= 40000  # an A100 40 GB, reserved memory aside
    assert 20 <= one["temperature_c"] <= 95
    assert 0 < one["power_w"] <= 400
    assert holders(one) == ["ml/train-0/main"]
    assert [holders(d) for i, d in enumerate(devices) if i != 1] == [[]] * 7

    table = node.gpudctl("top", "--once")
    assert table.returncode == 0, table.stderr
    assert "ml/train-0/main" in table.stdout and "20000/" in table.stdout


def test_mig_devices_have_a_row_each_with_the_pod_on_the_instance(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    migs = sorted(node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14))
    assert node.podres is not None
    node.podres.pods = [pod("ml", f"infer-{i}", main={MIG_1G: [m]}) for i, m in enumerate(migs)]

    devices = top(node)["devices"]
    assert len(devices) == 14
    assert {d["profile"] for d in devices} == {"1g.5gb"}
    assert sorted(d["mig_uuid"] for d in devices) == migs
    by_mig = {d["mig_uuid"]: d for d in devices}
    for i, mig in enumerate(migs):
        assert holders(by_mig[mig]) == [f"ml/infer-{i}/main"]
        # A 1g.5gb instance has about 5 GB of its own; MIG leaves the GPU's utilization unknown.
        assert 4000 <= by_mig[mig]["memory_total_mib"] <= 5120
        assert by_mig[mig]["health"] == "Healthy"


def test_every_pod_sharing_a_time_sliced_gpu_is_listed(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    config = (
        "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
        "    resources:\n    - name: nvidia.com/gpu\n      replicas: 3\n"
    )
    node = start(short_tmp, "a100-40gb:2", config)
    nodes.append(node)
    replicas = node.kubelet.wait_devices("nvidia.com/gpu.shared", lambda d: len(d) == 6)
    uuid = node.uuids()[0]
    assert f"{uuid}::2" in replicas
    assert node.podres is not None
    node.podres.pods = [
        pod("team-a", "notebook", jupyter={"nvidia.com/gpu.shared": [f"{uuid}::0"]}),
        pod("team-b", "batch", worker={"nvidia.com/gpu.shared": [f"{uuid}::2"]}),
    ]

    devices = top(node)["devices"]
    assert holders(devices[0]) == ["team-a/notebook/jupyter", "team-b/batch/worker"]
    assert holders(devices[1]) == []
    table = node.gpudctl("top", "--once").stdout
    assert "team-a/notebook/jupyter" in table and "team-b/batch/worker" in table


def test_without_kubelet_s_pod_resources_the_gpus_are_still_shown_and_top_says_why(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2", podres=False)
    nodes.append(node)
    data = top(node)
    assert "PodResources" in data["pods_error"] and str(node.podres_socket) in data["pods_error"]
    assert len(data["devices"]) == 2
    assert all(d["pods"] == [] and d["temperature_c"] is not None for d in data["devices"])
    table = node.gpudctl("top", "--once")
    assert table.returncode == 0 and "pods unknown:" in table.stdout


def test_refreshes_until_interrupted(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    argv = [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(node.gpud.socket)]
    proc = subprocess.Popen(
        [*argv, "top", "--interval", "0.2", "-o", "json"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        frames = [json.loads(lines.get(timeout=30)) for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert all(len(f["devices"]) == 2 for f in frames)


def test_on_a_terminal_the_view_is_redrawn_in_place(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    argv = [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(node.gpud.socket)]
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*argv, "top", "--interval", "0.2"], stdout=follower)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while seen.count(CLEAR.encode()) < 2 and time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                seen += os.read(leader, 65536)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    while select.select([leader], [], [], 0.5)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    text = seen.decode()
    assert proc.returncode == 0
    assert text.startswith(HIDE_CURSOR + CLEAR + "gpud top at ")
    assert text.count(CLEAR) >= 2 and text.endswith(SHOW_CURSOR)
    assert "Ctrl-C quits" in text and "HEALTH" in text


def test_bad_interval_and_no_gpud(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    bad = node.gpudctl("top", "--interval", "0")
    assert bad.returncode == 2 and "between 0.1 and 3600" in bad.stderr
    node.gpud.terminate()
    gone = node.gpudctl("top", "--once")
    assert gone.returncode == 1 and "cannot reach gpud" in gone.stderr
