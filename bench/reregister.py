"""kubelet restart -> gpud's GPU plugin registered again (budget: new kubelet.sock -> Register
in <= 5 ms).

The fake kubelet is restarted N times. Its gRPC server is wrapped so the bench knows when
``kubelet.sock`` was bound (the file appears inside ``add_insecure_port``) and when the server
started serving; the end point is ``Registration.at``, taken by the fake when the Register
request arrives (before it dials the plugin back). Between runs the bench waits until the
ListAndWatch stream lists the 8 GPUs again and pauses ``--gap`` seconds, so every restart hits
a settled gpud.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from bench._common import GPU, emit, log, running_node, summary_ms

BUDGET_MS = 5.0


class _TimedServer:
    """Proxy for the fake kubelet's grpc.Server that stamps bind and start with monotonic()."""

    def __init__(self, server: grpc.Server, marks: dict[str, float]) -> None:
        self._server = server
        self._marks = marks

    def add_insecure_port(self, address: str) -> int:
        self._marks["bind_begin"] = time.monotonic()
        port = self._server.add_insecure_port(address)
        self._marks["bound"] = time.monotonic()
        return port

    def start(self) -> None:
        self._server.start()
        self._marks["serving"] = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="kubelet restarts (default 50)")
    ap.add_argument(
        "--gap", type=float, default=0.1, help="pause on a settled node between restarts, s"
    )
    args = ap.parse_args()

    marks: dict[str, float] = {}
    real_server = grpc.server

    def timed_server(*a: Any, **kw: Any) -> Any:
        return _TimedServer(real_server(*a, **kw), marks)

    grpc.server = timed_server  # only the fake kubelet creates servers in this process
    from_bound: list[float] = []
    from_serving: list[float] = []
    from_restart: list[float] = []
    bind_window: list[float] = []
    early = 0
    with running_node("rereg") as node:
        k = node.kubelet
        time.sleep(0.5)  # let start-up work finish
        for i in range(args.runs):
            count = len([r for r in k.registrations if r.resource == GPU]) + 1
            marks.clear()
            begin = time.monotonic()
            k.restart()
            reg = k.wait_registered(GPU, count=count, timeout=10)
            from_restart.append(reg.at - begin)
            from_bound.append(reg.at - marks["bound"])
            from_serving.append(reg.at - marks["serving"])
            bind_window.append(marks["bound"] - marks["bind_begin"])
            if reg.at < marks["serving"]:
                early += 1
            k.wait_devices(
                GPU, lambda d: len(d) == 8 and all(x.health == "Healthy" for x in d.values())
            )
            time.sleep(args.gap)
            if (i + 1) % 10 == 0:
                log(f"reregister: {i + 1}/{args.runs}")
        registered = node.gpud.status().plugins[0].registered

    bound, serving, restart = (summary_ms(x) for x in (from_bound, from_serving, from_restart))
    figures = {
        "from_socket_created_p50_ms": bound["p50"],
        "from_socket_created_p95_ms": bound["p95"],
        "from_socket_created_max_ms": bound["max"],
        "from_serving_p50_ms": serving["p50"],
        "from_serving_p95_ms": serving["p95"],
        "from_serving_max_ms": serving["max"],
        "from_restart_begin_p50_ms": restart["p50"],
        "from_restart_begin_p95_ms": restart["p95"],
        "from_restart_begin_max_ms": restart["max"],
    }
    emit(
        "reregister",
        figures,
        {"from_socket_created_p50_ms": BUDGET_MS, "from_socket_created_p95_ms": BUDGET_MS},
        runs=args.runs,
        gap_s=args.gap,
        method=(
            "FakeKubelet.restart() (stop, delete sockets, serve kubelet.sock); "
            "'socket created' = add_insecure_port returned (the file exists from then), "
            "'serving' = server.start() returned, 'restart begin' = before stop(); "
            "end = Registration.at (Register request arrived at the fake kubelet)"
        ),
        detail={
            "from_socket_created_ms": bound,
            "from_serving_ms": serving,
            "from_restart_begin_ms": restart,
            "bind_call_ms": summary_ms(bind_window),
            "registered_before_serving_returned": early,
            "still_registered_at_end": registered,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
