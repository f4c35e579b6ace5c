"""DRA ResourceSlices after a MIG apply: how long from the apply being done to the cluster seeing
the new devices (no budget in DESIGN.md; NVIDIA's DRA driver needs a restart of its kubelet
plugin to see a new static MIG layout at all).

A real kube-apiserver (shared/tools/kube/kubekit) and a real gpud process on the simulated
dgx-a100 in ``allocation.mode: dra`` with the node's kubelet identity, as in
tests/test_dra_slices.py. ``gpudctl mig apply`` alternates between ``all-1g.5gb`` (56 MIG
devices) and ``all-disabled`` (8 GPUs), ``--runs`` times each way. The administrator's client
(lightkube, in a thread of this process) watches the node's ResourceSlices from before the
apply. ``applied_to_slices`` runs from the wall-clock stamp of the apply's last NVML step in
gpud's log (the GPUs hold the new layout) to the watch event whose slices hold the new
devices at one pool generation;
``request_to_slices`` from sending the ``ApplyMigLayout`` request (what ``gpudctl mig apply``
sends) to that event, the apply's own 128 NVML calls included. ``writes_per_change`` counts
the slice writes gpud logged per layout change.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, log, running_node, summary_ms
from tests.support.kubekit import Cluster, cluster
from tests.support.podresources import FakePodResources

_LAST_STEP = re.compile(r"^(\S+ \S+) INFO gpud\.daemon\.mig: MIG step (\d+)/\2: ", re.M)
_WRITES = re.compile(r"\((\d+) deleted, (\d+) updated, (\d+) created\)")


class SliceWatch:
    """(wall time, devices, generation) of the node's pool at every watch event."""

    def __init__(self, kube: Cluster) -> None:
        from lightkube import Client, KubeConfig

        self.kube = kube
        self.client = Client(KubeConfig.from_file(kube.admin), field_manager="bench")
        self.pool: dict[str, tuple[int, int]] = {}
        self.seen: list[tuple[float, int, int]] = []
        self.lock = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from lightkube.resources.resource_v1 import ResourceSlice

        fields = {"spec.nodeName": self.kube.node}
        try:
            self._follow(self.client.watch(ResourceSlice, fields=fields))
        except Exception as exc:  # the API server stopped at the end of the run
            log(f"slice watch ended: {type(exc).__name__}")

    def _follow(self, events: Any) -> None:
        for kind, item in events:
            now = time.time()
            name = item.metadata.name
            with self.lock:
                if kind == "DELETED":
                    self.pool.pop(name, None)
                else:
                    self.pool[name] = (len(item.spec.devices or ()), item.spec.pool.generation)
                gens = {g for _, g in self.pool.values()}
                if len(gens) == 1:
                    total = sum(n for n, _ in self.pool.values())
                    self.seen.append((now, total, gens.pop()))
                self.lock.notify_all()

    def wait(self, devices: int, after: float, timeout: float = 60.0) -> tuple[float, int]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for at, total, generation in self.seen:
                    if at >= after and total == devices:
                        return at, generation
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no pool of {devices} devices: {self.seen[-5:]}")
                self.lock.wait(left)


def last_step_at(log_text: str) -> float:
    """Wall time of the last apply's last NVML step: the GPUs hold the new layout."""
    stamps = [m.group(1) for m in _LAST_STEP.finditer(log_text)]
    if not stamps:
        raise RuntimeError("gpud logged no last MIG step")
    return datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="changes each way")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gb-kube-"))
    kube = cluster(root)
    applied: dict[str, list[float]] = {"all-1g.5gb": [], "all-disabled": []}
    requested: dict[str, list[float]] = {"all-1g.5gb": [], "all-disabled": []}
    writes = 0
    podres: list[FakePodResources] = []
    try:

        def setup(dir_: Path) -> list[str]:
            # kubelet's PodResources, with no pods: gpud asks it before every change.
            podres.append(FakePodResources(dir_ / "podres.sock").start())
            path = dir_ / "gpud.yaml"
            path.write_text(
                f"version: v1\nallocation:\n  mode: dra\n"
                f"kubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
                f"paths:\n  podResourcesSocket: {dir_ / 'podres.sock'}\n"
            )
            return ["--config", str(path)]

        with running_node("draslices", setup=setup) as node:
            watch = SliceWatch(kube)
            watch.wait(8, 0.0)
            generations: list[int] = []
            for run in range(args.runs):
                for layout, devices in (("all-1g.5gb", 56), ("all-disabled", 8)):
                    start = time.time()
                    answer = _apply(node, layout)
                    at, generation = watch.wait(devices, start)
                    done = last_step_at(node.gpud.log())
                    applied[layout].append(at - done)
                    requested[layout].append(at - start)
                    generations.append(generation)
                    log(
                        f"run {run + 1}: {layout} {answer}: slices {1000 * (at - done):.0f} ms "
                        f"after its last NVML step, pool generation {generation}"
                    )
            for match in _WRITES.finditer(node.gpud.log()):
                writes += sum(int(n) for n in match.groups())
    finally:
        for server in podres:
            server.stop()
        kube.down()
    both = applied["all-1g.5gb"] + applied["all-disabled"]
    emit(
        "dra_slices",
        {
            "applied_to_slices_p50_ms": summary_ms(both)["p50"],
            "applied_to_slices_max_ms": summary_ms(both)["max"],
            "request_to_slices_all_1g_5gb_p50_ms": summary_ms(requested["all-1g.5gb"])["p50"],
            "request_to_slices_all_disabled_p50_ms": summary_ms(requested["all-disabled"])["p50"],
            "writes_per_change": writes / (2 * args.runs),
        },
        {},
        method=(
            "gpud log stamp of the apply's last NVML step -> admin watch event with the whole pool "
            "at one generation holding the new device count; real kube-apiserver (kubekit) and "
            "gpud process, simulated dgx-a100, allocation.mode dra"
        ),
        detail={
            "applied_to_slices_all_1g_5gb": summary_ms(applied["all-1g.5gb"]),
            "applied_to_slices_all_disabled": summary_ms(applied["all-disabled"]),
            "generations": generations,
        },
    )


def _apply(node: Any, layout: str) -> str:
    """The layout applied through the control API, as ``gpudctl mig apply`` does."""
    from gpud._proto.gpud.v1 import gpud_pb2

    request = gpud_pb2.ApplyMigLayoutRequest(config_name=layout)
    reply = node.gpud.stub.ApplyMigLayout(request, timeout=300)
    if reply.result != "applied":
        raise SystemExit(f"apply {layout}: {reply.result}: {reply.message}")
    return str(reply.result)


if __name__ == "__main__":
    main()
