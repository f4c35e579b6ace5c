"""MIG by node label: ``nvidia.com/mig.config`` changed → ``nvidia.com/mig.config.state``
``pending``, then ``success``, as the cluster sees them (no budget in DESIGN.md; mig-manager,
for comparison, stops and waits for its own GPU pods before each change and starts them again
after, so its floor is tens of seconds).

A real kube-apiserver (shared/tools/kube/kubekit) and a real gpud process on the simulated
dgx-a100 with the node's kubelet identity, as in tests/test_kube_mig_label.py. The administrator's
client (lightkube, in this process) patches the label and follows the Node with a watch opened
before the patch; each figure runs from the patch's answer to the watch event that carries the
state. The label alternates between ``all-1g.5gb`` (8 mode changes and 112 instance creations:
128 NVML calls) and ``all-disabled`` (the reverse), ``--runs`` times each way; kubelet's stand-in
gets the new devices before ``success`` is written. ``applies_per_change`` counts the applies
gpud logged: 1.0 means each label change was applied once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, log, running_node, summary_ms
from tests.support.kubekit import Cluster, cluster
from tests.support.podresources import FakePodResources

CONFIG = "nvidia.com/mig.config"
STATE = "nvidia.com/mig.config.state"


def one_change(client: Any, kube: Cluster, layout: str) -> tuple[float, float]:
    """Seconds from the label patch to ``success`` and to ``pending``."""
    from lightkube.resources.core_v1 import Node
    from lightkube.types import PatchType

    current = client.get(Node, kube.node)
    version = current.metadata.resourceVersion
    if (current.metadata.labels or {}).get(STATE) != "success":
        raise RuntimeError(f"state before the change: {current.metadata.labels}")
    body = {"metadata": {"labels": {CONFIG: layout}}}
    start = time.monotonic()
    client.patch(Node, kube.node, body, patch_type=PatchType.MERGE)
    pending = None
    for _, node in client.watch(
        Node, fields={"metadata.name": kube.node}, resource_version=version, server_timeout=60
    ):
        state = (node.metadata.labels or {}).get(STATE)
        if state == "pending" and pending is None:
            pending = time.monotonic() - start
        # The patch's own event still carries the old value's success: the protocol (as
        # mig-manager's) says which value a state is for only by going through pending.
        if state == "success" and pending is not None:
            return time.monotonic() - start, pending
        if state == "failed":
            raise RuntimeError(f"{layout} failed")
    raise RuntimeError("the watch ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="changes each way")
    args = parser.parse_args()
    from lightkube import Client, KubeConfig

    root = Path(tempfile.mkdtemp(prefix="gb-kube-"))
    kube = cluster(root)
    podres: list[FakePodResources] = []
    try:
        client = Client(KubeConfig.from_file(kube.admin), field_manager="bench")

        def setup(dir_: Path) -> list[str]:
            # kubelet's PodResources, with no pods: gpud asks it before every change.
            podres.append(FakePodResources(dir_ / "podres.sock").start())
            path = dir_ / "gpud.yaml"
            path.write_text(
                f"version: v1\nkubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
                f"paths:\n  podResourcesSocket: {dir_ / 'podres.sock'}\n"
            )
            return ["--config", str(path)]

        with running_node("miglabel", setup=setup) as node:
            # The starting point: the Node asks for whole GPUs, which they are.
            kube.kubectl("label", "node", kube.node, f"{CONFIG}=all-disabled", "--overwrite")
            kube.wait_labels(lambda got: got.get(STATE) == "success", timeout=30)
            success: dict[str, list[float]] = {"all-1g.5gb": [], "all-disabled": []}
            pending: dict[str, list[float]] = {"all-1g.5gb": [], "all-disabled": []}
            for run in range(args.runs):
                for layout in ("all-1g.5gb", "all-disabled"):
                    took, first = one_change(client, kube, layout)
                    success[layout].append(took)
                    pending[layout].append(first)
                    log(f"run {run + 1}: {layout} success after {took * 1000:.0f} ms")
            applies = node.gpud.log().count("' applied with ")
    finally:
        for server in podres:
            server.stop()
        kube.down()
    to_mig = summary_ms(success["all-1g.5gb"])
    to_whole = summary_ms(success["all-disabled"])
    emit(
        "miglabel",
        {
            "label_to_success_all_1g_5gb_p50_ms": to_mig["p50"],
            "label_to_success_all_disabled_p50_ms": to_whole["p50"],
            "label_to_pending_p50_ms": summary_ms(pending["all-1g.5gb"] + pending["all-disabled"])[
                "p50"
            ],
            "applies_per_change": applies / (2 * args.runs),
        },
        {},
        method=(
            "admin patch of nvidia.com/mig.config -> watch event with nvidia.com/mig.config.state, "
            "real kube-apiserver (kubekit) and gpud process, simulated dgx-a100, 128 NVML calls "
            "per change"
        ),
        detail={
            "to_all_1g_5gb": to_mig,
            "to_all_disabled": to_whole,
        },
    )


if __name__ == "__main__":
    main()
