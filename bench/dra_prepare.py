"""Latency of gpud's DRA NodePrepareResources / NodeUnprepareResources as kubelet calls them.

No budget in DESIGN.md yet; kubelet allows 45 s per call. A real kube-apiserver with the real
scheduler and ResourceClaim controller (kubekit, ``scheduler,claims``) allocates one claim per
GPU of the simulated dgx-a100 from a ResourceSlice the node published; gpud runs in
``allocation.mode: dra`` with the node's kubelet credential, and a kubelet stand-in sends the
calls over the real ``dra.sock`` (Python's synchronous gRPC: its cost is in every figure).

Figures: a first Prepare (the claim is read from the API server, its CDI spec and the checkpoint
written, fsync included), a repeated Prepare (answered from the checkpoint, the spec rewritten,
as after a kubelet restart or a reboot), Unprepare, and one call preparing all 8 claims.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, log, short_tmp, summary_ms
from tests.support.draclaims import claimed_pod, device_class, node_slice
from tests.support.drakubelet import FakeDraKubelet
from tests.support.kubekit import cluster
from tests.support.mignode import start

DRIVER = "gpu.nvidia.com"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=25, help="prepare/unprepare rounds")
    args = parser.parse_args()
    kube_root = Path(tempfile.mkdtemp(prefix="gb-dra-kube-"))
    kube = cluster(kube_root, with_="scheduler,claims")
    try:
        gpus = [f"gpu-{i}" for i in range(8)]
        kube.kubectl(
            "create", "-f", "-", kubeconfig=kube.node_kubeconfig,
            stdin=json.dumps(node_slice(kube.node, DRIVER, gpus)),
        )  # fmt: skip
        kube.kubectl("create", "-f", "-", stdin=json.dumps(device_class(DRIVER)))
        claims = [claimed_pod(kube, DRIVER) for _ in gpus]
        log(f"{len(claims)} claims allocated")
        with short_tmp("dra") as root, FakeDraKubelet(root) as kubelet:
            config = (
                f"version: v1\nallocation:\n  mode: dra\ndra:\n  cdiDir: {root / 'cdi'}\n"
                f"kubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
            )
            node = start(root, "dgx-a100", config)
            try:
                kubelet.wait_registered(DRIVER)
                first, again, unprepare = [], [], []
                for _ in range(args.rounds):
                    for claim in claims:
                        t0 = time.perf_counter()
                        answer = kubelet.prepare(DRIVER, claim)
                        first.append(time.perf_counter() - t0)
                        assert answer[claim.uid]["error"] == "", answer
                        t0 = time.perf_counter()
                        kubelet.prepare(DRIVER, claim)
                        again.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        kubelet.unprepare(DRIVER, claim)
                        unprepare.append(time.perf_counter() - t0)
                batch = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    answer = kubelet.prepare(DRIVER, *claims)
                    batch.append(time.perf_counter() - t0)
                    assert all(not a["error"] for a in answer.values()), answer
                    kubelet.unprepare(DRIVER, *claims)
            finally:
                node.stop()
        figures = {
            "prepare_first_p50_ms": summary_ms(first)["p50"],
            "prepare_first_p99_ms": summary_ms(first)["p99"],
            "prepare_repeat_p50_ms": summary_ms(again)["p50"],
            "unprepare_p50_ms": summary_ms(unprepare)["p50"],
            "prepare_8_claims_one_call_p50_ms": summary_ms(batch)["p50"],
        }
        emit(
            "dra_prepare",
            figures,
            {},
            details={
                "prepare_first": summary_ms(first),
                "prepare_repeat": summary_ms(again),
                "unprepare": summary_ms(unprepare),
                "prepare_8_claims_one_call": summary_ms(batch),
                "kubelet_timeout_ms": 45000,
            },
        )
    finally:
        kube.down()
        shutil.rmtree(kube_root, ignore_errors=True)


if __name__ == "__main__":
    main()
