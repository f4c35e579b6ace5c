"""XID -> Kubernetes Event on the Node, and the Events/second cap under an XID storm.

A real kube-apiserver (shared/tools/kube/kubekit, as tests/test_kube_link.py uses it) and a
simulated dgx-a100 gpud with the node's kubelet identity. The bench process watches Events in
namespace ``default`` with the administrator's credential (lightkube's watch, in a thread) and
stamps ``time.monotonic()`` on each one as it arrives.

(a) latency: ``--runs`` times, t0 just before ``InjectXid`` (XID 79, GPU ``run % 8``) on the
control socket, t1 when the watch delivers the ``GPUXidError`` Event for that GPU; then
``SetDeviceHealthy``. Each run makes two Events, so runs beyond the node's burst (20 Events)
measure the rate limit, not the latency: keep ``--runs`` at 10 or below.
(b) storm: a second, fresh gpud; XIDs injected as fast as the control socket takes them on all
8 GPUs, for ``--storm-s`` seconds; the Events the API server received during the storm and for
``--tail-s`` seconds after it, and what gpud's status says it held back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, log, running_node, summary_ms
from gpud._proto.gpud.v1 import gpud_pb2
from gpud.kube.ratelimit import Limits
from tests.support.kubekit import Cluster, cluster


class EventWatch:
    """Every Event the API server announces in namespace default, with its arrival time."""

    def __init__(self, admin: Path) -> None:
        from lightkube import Client, KubeConfig
        from lightkube.resources.core_v1 import Event

        self._client = Client(KubeConfig.from_file(admin), trust_env=False)
        self._kind = Event
        self.seen: list[tuple[float, str, str, int]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for kind, event in self._client.watch(self._kind, namespace="default"):
                if kind != "ADDED" or event.reportingComponent != "gpud":
                    continue
                with self._lock:
                    self.seen.append(
                        (
                            time.monotonic(),
                            event.reason or "",
                            event.message or "",
                            event.count or 1,
                        )
                    )
        except Exception as exc:  # the API server stopped at the end of the bench
            log(f"event watch ended: {type(exc).__name__}")

    def since(self, t0: float) -> list[tuple[float, str, str, int]]:
        with self._lock:
            return [e for e in self.seen if e[0] >= t0]


def wait_for(watch: EventWatch, t0: float, match: Any, timeout: float = 10.0) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for at, reason, message, _ in watch.since(t0):
            if match(reason, message):
                return at
        time.sleep(0.002)
    return None


def kube_config(kube: Cluster) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        path = root / "gpud.yaml"
        path.write_text(f"version: v1\nkubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n")
        return ["--config", str(path)]

    return setup


def held_back(node: Any) -> int:
    for p in node.gpud.status().publishers:
        if p.name == "kubernetes" and " held back by the rate limit" in p.detail:
            return int(p.detail.split(" held back by the rate limit")[0].rsplit(" ", 1)[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="latency runs (default 10, at most 10)")
    ap.add_argument("--storm-s", type=float, default=30.0, help="storm length, s (default 30)")
    ap.add_argument("--tail-s", type=float, default=10.0, help="watch after the storm, s")
    args = ap.parse_args()
    limits = Limits()

    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="gb-kube-"))
    kube = cluster(root)
    try:
        watch = EventWatch(kube.admin)
        latency: list[float] = []
        missed = 0
        with running_node("kev", setup=kube_config(kube)) as node:
            stub = node.gpud.stub
            uuids = [g.uuid for g in sorted(node.gpud.status().gpus, key=lambda g: g.index)]
            time.sleep(1.0)  # let the link settle (labels, condition)
            for i in range(min(args.runs, limits.node_burst // 2)):
                uuid = uuids[i % 8]
                t0 = time.monotonic()
                stub.InjectXid(gpud_pb2.InjectXidRequest(gpu_index=i % 8, xid=79))
                t1 = wait_for(watch, t0, lambda r, m, u=uuid: r == "GPUXidError" and u in m)
                if t1 is None:
                    missed += 1
                else:
                    latency.append(t1 - t0)
                t2 = time.monotonic()
                stub.SetDeviceHealthy(gpud_pb2.SetDeviceHealthyRequest(uuid=uuid))
                wait_for(watch, t2, lambda r, m, u=uuid: r == "GPUBackInService" and u in m)
            log(f"latency: {len(latency)} runs")

        with running_node("kst", setup=kube_config(kube)) as node:
            stub = node.gpud.stub
            time.sleep(1.0)
            t0 = time.monotonic()
            injected = 0
            while time.monotonic() - t0 < args.storm_s:
                stub.InjectXid(gpud_pb2.InjectXidRequest(gpu_index=injected % 8, xid=48))
                injected += 1
            storm_s = time.monotonic() - t0
            time.sleep(args.tail_s)
            window_s = time.monotonic() - t0
            during = [e for e in watch.since(t0) if e[1] == "GPUXidError"]
            held = held_back(node)
            log(f"storm: {injected} XIDs, {len(during)} Events")

        cap = limits.node_burst + window_s / limits.node_every_s
        stood_for = sum(e[3] for e in during)
        s = summary_ms(latency)
        figures = {
            "xid_to_event_p50_ms": s["p50"],
            "xid_to_event_max_ms": s["max"],
            "storm_xids_per_s": round(injected / storm_s, 1),
            "storm_events": len(during),
            "storm_events_per_s": round(len(during) / window_s, 3),
            "storm_events_cap": round(cap, 1),
        }
        emit(
            "kube_events",
            figures,
            {},
            runs=len(latency),
            method=(
                "real kube-apiserver (kubekit) and gpud with the kubelet identity; t0 before "
                "InjectXid, t1 when the admin's Event watch (lightkube, bench process) delivers "
                "the GPUXidError Event; storm = XID 48 round-robin on 8 GPUs as fast as the "
                "control socket takes them, Events counted over the storm and --tail-s after; "
                "cap = node burst + window / node period"
            ),
            limits={
                "key_burst": limits.key_burst,
                "key_every_s": limits.key_every_s,
                "node_burst": limits.node_burst,
                "node_every_s": limits.node_every_s,
            },
            detail={
                "xid_to_event_ms": s,
                "missed": missed,
                "storm_xids": injected,
                "storm_s": round(storm_s, 2),
                "window_s": round(window_s, 2),
                "held_back_in_status": held,
                "xids_the_events_stand_for": stood_for,
            },
        )
    finally:
        kube.down()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
