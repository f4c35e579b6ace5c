"""/metrics: scrape time, NVML calls per scrape, RSS added by metrics, idle CPU with nobody
scraping (budgets: scrape p50 <= 20 ms on the simulated backend, <= 10 MiB RSS, 0 idle ticks).

Scrapes go over HTTP to a real gpud process on a simulated dgx-a100, the way Prometheus scrapes:
one connection per scrape, PodResources asked each time (a fake kubelet's over real gRPC). Two
node shapes: whole GPUs with 8 pods, and ``all-1g.5gb`` (56 MIG devices) with 56 pods, one on
each. The time is the client's, request sent to body read, after 3 warm-up scrapes.

NVML calls per scrape: in process, the publisher's whole scrape path (telemetry, rows, families,
text) over the NVML backend on the fake ``nvmlLib`` (tests/fakenvml.py) as a DGX A100, counted
by the fake library itself; the simulated backend makes none.

RSS: VmRSS of gpud with ``metrics.enabled: false`` and with it on after the timed scrapes, same
machine and pods. Idle: gpud's ticks (/proc/<pid>/stat) over ``--idle`` seconds with metrics
on and nobody scraping any more (``--settle`` seconds after the timed scrapes, so the kept
PodResources channel and the scrape's worker thread exist), and the same window of the node with
metrics disabled; per thread, the threads that ran. gRPC's own threads (the control API and the
plugins use gRPC) wake now and then on any gpud; metrics adds no thread that wakes by itself.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import CLK_TCK, Node, cpu_ticks, emit, log, running_node, summary_ms
from bench.idle import kib, status_fields, threads
from gpud.hw.nvml import NvmlBackend
from gpud.metrics.exposition import render
from gpud.metrics.publisher import Scrape
from gpud.node.stats import NodeStats
from gpud.observe.pods import PodRef
from tests.fakenvml import dgx_a100, installed
from tests.support.metrics import metrics_address
from tests.support.podresources import FakePodResources, pod
from tests.support.snapshot import snapshot

BUDGET_SCRAPE_P50_MS = 20.0
BUDGET_RSS_MIB = 10.0
MIG_1G = "nvidia.com/mig-1g.5gb"


def config(root: Path, metrics: bool) -> Sequence[str]:
    path = root / "gpud.yaml"
    path.write_text(
        "version: v1\n"
        "devicePlugin:\n  migStrategy: mixed\n"
        f"metrics:\n  enabled: {'true' if metrics else 'false'}\n"
        f"paths:\n  podResourcesSocket: {root / 'podres.sock'}\n"
    )
    return ["--config", str(path)]


def gpudctl(node: Node, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(node.gpud.socket), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout


def scrape_times(address: str, scrapes: int) -> tuple[list[float], int]:
    host, port = address.rsplit(":", 1)
    durations = []
    size = 0
    for n in range(scrapes + 3):
        start = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        conn.close()
        elapsed = time.perf_counter() - start
        assert response.status == 200, body[:200]
        if n >= 3:
            durations.append(elapsed)
        size = len(body)
    return durations, size


def rss_mib(pid: int) -> float:
    return kib(status_fields(Path(f"/proc/{pid}/status"))["VmRSS"])


def node_case(mig: bool, scrapes: int, idle_s: float, settle_s: float) -> dict[str, object]:
    out: dict[str, object] = {}
    with running_node("metrics", setup=lambda root: config(root, True)) as node:
        podres = FakePodResources(node.root / "podres.sock").start()
        try:
            uuids = [g.uuid for g in node.gpud.status().gpus]
            if mig:
                gpudctl(node, "mig", "apply", "-c", "all-1g.5gb")
                devices = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56, timeout=120)
                held = {MIG_1G: sorted(devices)}
            else:
                held = {"nvidia.com/gpu": uuids}
            podres.pods = [
                pod("ml", f"p{n}", main={resource: [device]})
                for resource, ids in held.items()
                for n, device in enumerate(ids)
            ]
            pid = node.gpud.pid
            assert pid is not None
            address = metrics_address(node.gpud)
            node.gpud._close_channel()
            ticks0 = cpu_ticks(pid)
            durations, size = scrape_times(address, scrapes)
            ticks = cpu_ticks(pid) - ticks0
            out["scrape"] = summary_ms(durations)
            # gpud's own CPU per scrape: what a loaded machine's wall times cannot show.
            out["gpud_cpu_ms_per_scrape"] = round(ticks / CLK_TCK * 1000 / (scrapes + 3), 2)
            out["exposition_bytes"] = size
            out["pods"] = len(podres.pods)
            out["rss_mib"] = round(rss_mib(pid), 1)
            if not mig:
                out["idle_ticks"], out["idle_threads_that_ran"] = idle_window(pid, settle_s, idle_s)
        finally:
            podres.stop()
    return out


def idle_window(pid: int, settle_s: float, idle_s: float) -> tuple[int, list[dict[str, object]]]:
    """gpud's ticks over ``idle_s`` after ``settle_s``, and the threads that ran (exact on-CPU
    time from schedstat, ticks)."""
    time.sleep(settle_s)
    ticks0, before = cpu_ticks(pid), threads(pid)
    time.sleep(idle_s)
    after, ticks = threads(pid), cpu_ticks(pid) - ticks0
    zero = {"ticks": 0, "runtime_ns": 0}
    ran: list[dict[str, object]] = [
        {
            "name": t["name"],
            "ticks": t["ticks"] - before.get(tid, zero)["ticks"],
            "cpu_ms": round((t["runtime_ns"] - before.get(tid, zero)["runtime_ns"]) / 1e6, 3),
        }
        for tid, t in after.items()
        if t["runtime_ns"] != before.get(tid, zero)["runtime_ns"]
    ]
    return ticks, ran


def without_metrics(settle_s: float, idle_s: float) -> dict[str, object]:
    """The same node with metrics.enabled false: its RSS, and its idle window for comparison."""
    with running_node("nometrics", setup=lambda root: config(root, False)) as node:
        podres = FakePodResources(node.root / "podres.sock").start()
        try:
            pid = node.gpud.pid
            assert pid is not None
            node.gpud._close_channel()
            ticks, ran = idle_window(pid, settle_s, idle_s)
            return {
                "rss_mib": round(rss_mib(pid), 1),
                "idle_ticks": ticks,
                "idle_threads_that_ran": ran,
            }
        finally:
            podres.stop()


def nvml_calls_per_gpu(scrapes: int) -> dict[str, object]:
    """The publisher's scrape path over fake NVML; NVML calls as the fake library counts them."""
    library = dgx_a100()
    with installed(library):
        backend = NvmlBackend()
        backend.open()
        try:
            state = snapshot(backend)  # type: ignore[arg-type]
            pods = {
                ("nvidia.com/gpu", g.uuid): (PodRef("ml", f"p{g.index}", "main"),)
                for g in state.gpus
            }
            stats = NodeStats().read()

            def one() -> int:
                before = sum(library.calls.values())
                body = render(Scrape(state, pods, stats, backend, "node").collect())
                assert b"DCGM_FI_DEV_GPU_UTIL" in body
                return sum(library.calls.values()) - before

            first = one()
            durations = []
            calls = 0
            for _ in range(scrapes):
                start = time.perf_counter()
                calls = one()
                durations.append(time.perf_counter() - start)
        finally:
            backend.close()
    return {
        "nvml_calls_per_scrape_per_gpu": calls / len(state.gpus),
        "nvml_calls_first_scrape_per_gpu": first / len(state.gpus),
        "in_process_scrape": summary_ms(durations),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=200, help="timed scrapes per case")
    ap.add_argument("--idle", type=float, default=30.0, help="idle window, s (default 30)")
    ap.add_argument(
        "--settle", type=float, default=10.0, help="pause after the scrapes, before the window, s"
    )
    args = ap.parse_args()

    log("metrics: dgx-a100 whole GPUs, 8 pods (and the idle window)")
    whole = node_case(False, args.scrapes, args.idle, args.settle)
    log("metrics: dgx-a100 all-1g.5gb, 56 pods")
    mig = node_case(True, args.scrapes, args.idle, args.settle)
    log("metrics: gpud with metrics disabled")
    without = without_metrics(args.settle, args.idle)
    log("metrics: NVML calls per scrape (fake NVML, in process)")
    nvml = nvml_calls_per_gpu(args.scrapes // 4 or 1)

    figures = {
        "scrape_whole_p50_ms": whole["scrape"]["p50"],  # type: ignore[index]
        "scrape_whole_p99_ms": whole["scrape"]["p99"],  # type: ignore[index]
        "scrape_mig56_p50_ms": mig["scrape"]["p50"],  # type: ignore[index]
        "scrape_mig56_p99_ms": mig["scrape"]["p99"],  # type: ignore[index]
        "gpud_cpu_whole_ms_per_scrape": whole["gpud_cpu_ms_per_scrape"],
        "gpud_cpu_mig56_ms_per_scrape": mig["gpud_cpu_ms_per_scrape"],
        "nvml_calls_per_scrape_per_gpu": nvml["nvml_calls_per_scrape_per_gpu"],
        "sim_nvml_calls_per_scrape": 0,
        "rss_added_mib": round(float(whole["rss_mib"]) - float(without["rss_mib"]), 1),  # type: ignore[arg-type]
        "idle_ticks": whole["idle_ticks"],
        "idle_ticks_metrics_disabled": without["idle_ticks"],
    }
    emit(
        "metrics",
        figures,
        {
            "scrape_whole_p50_ms": BUDGET_SCRAPE_P50_MS,
            "scrape_mig56_p50_ms": BUDGET_SCRAPE_P50_MS,
            "rss_added_mib": BUDGET_RSS_MIB,
            "idle_ticks": 0,
        },
        method=(
            "GET /metrics over HTTP, a new connection each, to gpud on a simulated dgx-a100 "
            "with a fake kubelet's PodResources; after 3 warm-up scrapes. RSS: VmRSS after the "
            "scrapes minus gpud with metrics.enabled false. Idle: utime+stime over the window "
            f"(USER_HZ={CLK_TCK}), no scraper. NVML calls: fake libnvidia-ml, in process."
        ),
        detail={
            "whole_gpus": whole,
            "all_1g_5gb": mig,
            "metrics_disabled": without,
            "idle_s": args.idle,
            "settle_s": args.settle,
            "fake_nvml_dgx_a100": nvml,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
