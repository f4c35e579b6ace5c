"""XID injected -> kubelet sees the GPU Unhealthy in its ListAndWatch stream (budget <= 20 ms).

For each run an XID (79 by default: GPU fell off the bus, a critical one) is injected on GPU
``run % 8`` through gpud's control API (``InjectXid`` on the control socket, as
``gpudctl debug inject-xid`` does; needs root). t0 is taken just before the call; t1 is the
``time.monotonic()`` the fake kubelet's stream thread stamped on the first ListAndWatch message
that lists that GPU as Unhealthy (the ``on_update`` hook). The GPU is then returned with
``SetDeviceHealthy`` and the bench waits for all 8 to be Healthy again before the next run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GPU, emit, log, running_node, summary_ms
from gpud._proto.gpud.v1 import gpud_pb2
from tests.support.kubelet import HEALTHY, UNHEALTHY

BUDGET_MS = 20.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="injections (default 30)")
    ap.add_argument("--xid", type=int, default=79, help="XID to inject (default 79)")
    ap.add_argument("--gap", type=float, default=0.02, help="pause between runs, s")
    args = ap.parse_args()

    seen = threading.Event()
    target: dict[str, str | float] = {}

    with running_node("xid") as node:
        k = node.kubelet
        stub = node.gpud.stub
        uuids = [g.uuid for g in sorted(node.gpud.status().gpus, key=lambda g: g.index)]

        def on_update(resource: str, now: float) -> None:
            uuid = target.get("uuid")
            if resource != GPU or uuid is None or seen.is_set():
                return
            dev = k.devices(GPU).get(str(uuid))
            if dev is not None and dev.health == UNHEALTHY:
                target["t1"] = now
                seen.set()

        k.on_update = on_update
        time.sleep(0.5)  # let start-up work finish
        to_kubelet: list[float] = []
        rpc_return: list[float] = []
        messages: list[int] = []
        missed = 0
        for i in range(args.runs):
            index = i % len(uuids)
            uuid = uuids[index]
            updates0 = k.updates(GPU)
            seen.clear()
            target.clear()
            target["uuid"] = uuid
            t0 = time.monotonic()
            resp = stub.InjectXid(gpud_pb2.InjectXidRequest(gpu_index=index, xid=args.xid))
            t_ret = time.monotonic()
            if not resp.marked_unhealthy:
                raise SystemExit(f"XID {args.xid} is ignored by gpud's policy; pick another")
            if seen.wait(timeout=5.0):
                to_kubelet.append(float(target["t1"]) - t0)
            else:
                missed += 1
            rpc_return.append(t_ret - t0)
            target.clear()
            stub.SetDeviceHealthy(gpud_pb2.SetDeviceHealthyRequest(uuid=uuid))
            k.wait_devices(
                GPU, lambda d: len(d) == 8 and all(x.health == HEALTHY for x in d.values())
            )
            messages.append(k.updates(GPU) - updates0)
            time.sleep(args.gap)
            if (i + 1) % 10 == 0:
                log(f"xid: {i + 1}/{args.runs}")
        k.on_update = None

    s = summary_ms(to_kubelet)
    figures = {
        "to_kubelet_unhealthy_p50_ms": s["p50"],
        "to_kubelet_unhealthy_p95_ms": s["p95"],
        "to_kubelet_unhealthy_max_ms": s["max"],
    }
    emit(
        "xid",
        figures,
        {"to_kubelet_unhealthy_p95_ms": BUDGET_MS, "to_kubelet_unhealthy_max_ms": BUDGET_MS},
        runs=args.runs,
        xid=args.xid,
        method=(
            "t0 before InjectXid on the control socket; t1 = monotonic() stamped by the fake "
            "kubelet's stream thread on the first ListAndWatch message listing the GPU "
            "Unhealthy; reset with SetDeviceHealthy between runs"
        ),
        detail={
            "to_kubelet_unhealthy_ms": s,
            "inject_rpc_returned_ms": summary_ms(rpc_return),
            "missed": missed,
            "stream_messages_per_cycle": sorted(set(messages)),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
