"""gpud's /metrics as Prometheus and dcgm-exporter's Grafana dashboard (12239) see it.

gpud runs as a real process on simulated GPUs; a real Prometheus scrapes it every second; the
dashboard's queries go through Prometheus' HTTP API (shared/reference/cluster-integration.md
§1.6). Pods come from a fake kubelet's PodResources over real gRPC. One Prometheus serves the
module: its start takes seconds.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.metrics import get, lines, metrics_address
from tests.support.mignode import MigNode, start
from tests.support.node import Node, make_node
from tests.support.podresources import FakePodResources, pod
from tests.support.prometheus import Prometheus

pytestmark = pytest.mark.integration

MIG_1G = "nvidia.com/mig-1g.5gb"
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
# Every panel of the dashboard, $instance and $gpu filled in as Grafana does for "All".
PANELS = {
    "GPU Temperature": ("DCGM_FI_DEV_GPU_TEMP{{{f}}}", "per-gpu"),
    "GPU Avg. Temp": ("avg(DCGM_FI_DEV_GPU_TEMP{{{f}}})", "one"),
    "GPU Power Usage": ("DCGM_FI_DEV_POWER_USAGE{{{f}}}", "per-gpu"),
    "GPU Power Total": ("sum(DCGM_FI_DEV_POWER_USAGE{{{f}}})", "one"),
    "GPU SM Clocks": ("DCGM_FI_DEV_SM_CLOCK{{{f}}} * 1000000", "per-gpu"),
    "GPU Utilization": ("DCGM_FI_DEV_GPU_UTIL{{{f}}}", "per-gpu"),
    "GPU Framebuffer Mem Used": ("DCGM_FI_DEV_FB_USED{{{f}}}", "per-gpu"),
    "Tensor Core Utilization": ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{f}}}", "per-gpu"),
}


@dataclass
class Cluster:
    prometheus: Prometheus
    # job name -> (node, /metrics address)
    nodes: dict[str, tuple[Node, str]]
    # MIG node: pod name -> (gpu index, GPU instance ID) of the device it holds
    mig_pods: dict[str, tuple[str, str]]

    def address(self, job: str) -> str:
        return self.nodes[job][1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="gpud-prom-"))
    nodes: list[Node] = []
    prometheus: Prometheus | None = None
    for name in ("h100", "a100", "mig", "ts"):
        (root / name).mkdir()
    try:
        h100 = make_node(root / "h100", "dgx-h100")
        a100 = make_node(root / "a100", "dgx-a100")
        for node in (h100, a100):
            node.gpud.start()
            nodes.append(node)
        mig = start(root / "mig", "dgx-a100", MIXED)
        nodes.append(mig)
        shared = start(root / "ts", "a100-40gb:2", TIME_SLICED)
        nodes.append(shared)
        for node in (h100, a100):
            node.gpud.wait_ready()

        # all-1g.5gb on every A100 of the MIG node, a pod on each of its 56 MIG devices.
        code, applied = mig.mig("apply", "-c", "all-1g.5gb")
        assert code == 0, applied
        devices = mig.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)
        layout = mig.state()
        where = {
            i["mig_uuid"]: (str(g["index"]), str(i["gi_id"]))
            for g in layout["gpus"]
            for i in g["instances"]
        }
        assert set(where) == set(devices)
        mig_pods = {f"train-{n}": where[uuid] for n, uuid in enumerate(sorted(where))}
        assert mig.podres is not None
        mig.podres.pods = [
            pod("ml", name, main={MIG_1G: [uuid]})
            for name, uuid in zip(mig_pods, sorted(where), strict=True)
        ]

        # Three pods on replicas of GPU 0 of the time-sliced node (renamed resource).
        gpu0 = shared.uuids()[0]
        assert shared.podres is not None
        shared.podres.pods = [
            pod("ml", "a", main={"nvidia.com/gpu.shared": [f"{gpu0}::0"]}),
            pod("ml", "b", main={"nvidia.com/gpu.shared": [f"{gpu0}::1"]}),
            pod("dev", "c", nb={"nvidia.com/gpu.shared": [f"{gpu0}::3"]}),
        ]

        named = {"h100": h100, "a100": a100, "mig": mig, "ts": shared}
        addresses = {job: metrics_address(node.gpud) for job, node in named.items()}
        prometheus = Prometheus(root / "prometheus", addresses)
        yield Cluster(
            prometheus,
            {job: (node, addresses[job]) for job, node in named.items()},
            mig_pods,
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        for node in nodes:
            if node.gpud.running():
                node.gpud.terminate()
            if isinstance(node, MigNode):
                node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("job", ["h100", "a100"])
def test_every_panel_of_the_dashboard_has_one_series_per_gpu(cluster: Cluster, job: str) -> None:
    prom = cluster.prometheus
    address = cluster.address(job)
    f = f'instance=~"{address}", gpu=~".*"'
    # Two scrapes: the rates (GPM, NVLink) have values from the second one.
    prom.until(f"count(count_over_time(DCGM_FI_DEV_GPU_TEMP{{{f}}}[1m]) >= 2)", 1)
    gpus = [str(i) for i in range(8)]
    for panel, (template, shape) in PANELS.items():
        result = prom.query(template.format(f=f))
        if job == "a100" and panel == "Tensor Core Utilization":
            assert result == [], "an A100 has no GPM: the series is absent, not 0"
            continue
        if shape == "one":
            assert len(result) == 1, (panel, result)
            assert float(result[0]["value"][1]) > 0, panel
        else:
            assert sorted(r["metric"]["gpu"] for r in result) == gpus, (panel, result)
            assert all(r["metric"]["instance"] == address for r in result), panel
    # The dashboard's variables: label_values(DCGM_FI_DEV_GPU_TEMP, instance) and (…, gpu).
    instances = prom.api("label/instance/values", **{"match[]": "DCGM_FI_DEV_GPU_TEMP"})
    assert address in instances
    values = prom.api("label/gpu/values", **{"match[]": f"DCGM_FI_DEV_GPU_TEMP{{{f}}}"})
    assert sorted(values) == gpus


def test_each_pod_finds_its_mig_instance(cluster: Cluster) -> None:
    prom = cluster.prometheus
    address = cluster.address("mig")
    f = f'instance="{address}"'
    found = prom.until(f'DCGM_FI_DEV_FB_USED{{{f}, pod!=""}}', len(cluster.mig_pods))
    assert {
        r["metric"]["pod"]: (r["metric"]["gpu"], r["metric"]["GPU_I_ID"]) for r in found
    } == cluster.mig_pods
    assert {r["metric"]["GPU_I_PROFILE"] for r in found} == {"1g.5gb"}
    (one,) = prom.query(f'DCGM_FI_DEV_FB_USED{{{f}, pod="train-17"}}')
    assert (one["metric"]["gpu"], one["metric"]["GPU_I_ID"]) == cluster.mig_pods["train-17"]
    assert one["metric"]["namespace"] == "ml" and one["metric"]["container"] == "main"
    # No whole-GPU rows on a MIG GPU, and no GPU_UTIL there (NVML has none in MIG mode).
    assert prom.query(f"DCGM_FI_DEV_GPU_UTIL{{{f}}}") == []


def test_every_pod_sharing_a_time_sliced_gpu_has_its_own_row(cluster: Cluster) -> None:
    prom = cluster.prometheus
    f = f'instance="{cluster.address("ts")}"'
    rows = prom.until(f'DCGM_FI_DEV_FB_USED{{{f}, gpu="0"}}', 3)
    assert sorted((r["metric"]["namespace"], r["metric"]["pod"]) for r in rows) == [
        ("dev", "c"),
        ("ml", "a"),
        ("ml", "b"),
    ]
    (unheld,) = prom.query(f'DCGM_FI_DEV_FB_USED{{{f}, gpu="1"}}')
    assert "pod" not in unheld["metric"]


def test_health_and_content_type_as_dcgm_exporter_serves_them(cluster: Cluster) -> None:
    address = cluster.address("h100")
    assert get(address, "/health")[0::2] == (200, "OK")
    status, content_type, body = get(address, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert lines(body, "gpud_build_info")
    assert get(address, "/nothing")[0] == 404


def test_an_unreachable_pod_resources_api_drops_pod_labels_and_says_why(
    short_tmp: Path,
) -> None:
    node = start(short_tmp, "a100-40gb:2", TIME_SLICED, podres=False)
    try:
        address = metrics_address(node.gpud)
        status, _, body = get(address)
        assert status == 200 and lines(body, "DCGM_FI_DEV_FB_USED")
        assert not any("pod" in r.label for r in lines(body))
        out = node.gpudctl("status", "-o", "json")
        (metrics,) = [p for p in json.loads(out.stdout)["publishers"] if p["name"] == "metrics"]
        assert metrics["state"] == "degraded"
        assert "no pod labels" in metrics["error"] and str(node.podres_socket) in metrics["error"]
        assert "no pod labels" in node.gpudctl("status").stdout

        # kubelet's API comes back: the next scrape has the pod, and the publisher is well.
        gpu0 = node.uuids()[0]
        node.podres = FakePodResources(
            node.podres_socket, [pod("ml", "a", main={"nvidia.com/gpu.shared": [f"{gpu0}::2"]})]
        ).start()
        body = get(address)[2]
        held = [r for r in lines(body, "DCGM_FI_DEV_FB_USED") if "pod" in r.label]
        assert [(r.label["gpu"], r.label["pod"]) for r in held] == [("0", "a")]
        out = node.gpudctl("status", "-o", "json")
        (metrics,) = [p for p in json.loads(out.stdout)["publishers"] if p["name"] == "metrics"]
        assert metrics["state"] == "ok", metrics

        # kubelet restarts between two scrapes: the next scrape reaches the new one.
        node.podres.stop()
        node.podres = FakePodResources(node.podres_socket, node.podres.pods).start()
        body = get(address)[2]
        assert [r.label["pod"] for r in lines(body, "DCGM_FI_DEV_FB_USED") if "pod" in r.label] == [
            "a"
        ]
    finally:
        node.stop()


def test_a_scrape_during_a_mig_apply_answers_with_the_withdrawn_devices_marked(
    short_tmp: Path,
) -> None:
    node = start(short_tmp, "a100-40gb:2", MIXED)
    try:
        assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
        node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
        address = metrics_address(node.gpud)
        during: list[tuple[int, str]] = []

        def scrape_while_withdrawn(resource: str, at: float) -> None:
            devices = node.kubelet.devices(resource)
            withdrawn = devices and all(d.health == "Unhealthy" for d in devices.values())
            if resource == MIG_1G and withdrawn and not during:
                during.append(get(address)[0::2])

        node.kubelet.on_update = scrape_while_withdrawn
        assert node.mig("apply", "-c", "all-balanced")[0] == 0
        assert during, "no scrape happened while the devices were withdrawn"
        status, body = during[0]
        assert status == 200
        withdrawn = lines(body, "gpud_device_withdrawn")
        assert {r.value for r in withdrawn if r.label["profile"] == "1g.5gb"} == {"1"}
        # Every GPU still has its rows, each GPU instance of the layout being replaced included.
        xid = lines(body, "DCGM_FI_DEV_XID_ERRORS")
        assert {r.label["gpu"] for r in xid} == {"0", "1"}
        after = get(address)[2]
        assert {r.value for r in lines(after, "gpud_device_withdrawn")} == {"0"}
    finally:
        node.kubelet.on_update = None
        node.stop()


def test_a_metrics_address_that_cannot_be_bound_stops_gpud_run_naming_it(
    short_tmp: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        argv = [
            sys.executable,
            "-m",
            "gpud.cli.gpud_main",
            "run",
            "--simulate",
            "t4x1",
            "--kubelet-dir",
            str(short_tmp / "k"),
            "--state-dir",
            str(short_tmp / "s"),
            "--socket",
            str(short_tmp / "g.sock"),
        ]
        busy = subprocess.run(
            [*argv, "--metrics-listen", address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert busy.returncode == 1, busy.stderr
    assert f"cannot serve /metrics on {address}" in busy.stderr
    assert "address already in use" in busy.stderr.lower()
    assert not (short_tmp / "g.sock").exists(), "the control socket is withdrawn again"

    config = short_tmp / "gpud.yaml"
    config.write_text("version: v1\nmetrics:\n  listen: '9400'\n")
    bad = subprocess.run(
        [*argv, "--config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2 and "metrics.listen" in bad.stderr, bad.stderr
    flag = subprocess.run(
        [*argv, "--metrics-listen", "[::1:9400"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert flag.returncode == 2 and "--metrics-listen" in flag.stderr, flag.stderr
