"""Latency of gpud's device-plugin RPCs as kubelet calls them: Allocate (one caller, then 8, 32
and 64 concurrent callers) and GetPreferredAllocation, with a trivial RPC as the floor.

Budgets: Allocate one caller <= 0.4 ms; Allocate p99 <= 1.5 ms (8 callers) / <= 3.4 ms
(32 callers); GetPreferredAllocation <= 0.5 ms. The 64-caller figure has no budget.

After the fake kubelet has registered gpud's GPU plugin, the bench dials the plugin's socket
itself (the v1beta1 stub over ONE shared channel, as kubelet keeps one connection per plugin;
``--channel-per-caller`` gives each thread its own) and times every call with
``perf_counter``. The client is Python's synchronous gRPC; the reference figures in DESIGN.md
came from a Go client, so the client's own cost is part of every figure here. The details
show where the time goes: CPU per call of gpud (from /proc/<pid>/stat, 10 ms ticks over
thousands of calls) and of the client process, and under concurrency the share of a core each
used (1.0 = one core busy all the time).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from bench._common import (
    CLK_TCK,
    GPU,
    SPEC,
    cpu_ticks,
    emit,
    log,
    percentile,
    running_node,
    short_tmp,
    summary_ms,
)
from gpud._proto.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

RPC_TIMEOUT_S = 10.0


def own_cpu() -> float:
    """CPU seconds of this (client) process so far."""
    t = os.times()
    return t.user + t.system


def dial(path: Path) -> grpc.Channel:
    channel = grpc.insecure_channel(
        f"unix:{path}", options=[("grpc.default_authority", "localhost")]
    )
    grpc.channel_ready_future(channel).result(timeout=10)
    return channel


def allocate_request(ids: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
    )


def preferred_request(
    available: list[str], must: list[str], size: int
) -> api_pb2.PreferredAllocationRequest:
    return api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
            )
        ]
    )


def handler_costs(runs: int) -> dict[str, float]:
    """Microseconds per call of the handlers' own work (no gRPC), on the same simulated machine
    built in-process: what gpud adds on top of the gRPC floor."""
    from gpud.config.models import default_config
    from gpud.deviceplugin.servicer import Snapshot, allocate_response
    from gpud.hw.sim.backend import SimBackend
    from gpud.resources.gpus import resource_sets
    from gpud.resources.preferred import preferred_allocation
    from gpud.resources.topology import Topology

    with short_tmp("handlers") as state:
        backend = SimBackend(SPEC, state)
        backend.open()
        try:
            gpus = backend.gpus()
        finally:
            backend.close()
    topology = Topology.from_gpus(gpus)
    rs = next(r for r in resource_sets(gpus, {}) if r.resource == GPU)
    snapshot = Snapshot(rs, topology, default_config().device_plugin, ())
    by_id = snapshot.devices()
    ids = sorted(by_id)
    node1 = next(g.uuid for g in gpus if g.numa_node == 1)
    cases: dict[str, Callable[[], Any]] = {
        "allocate_1gpu": lambda: allocate_response(snapshot, [ids[0]]),
        "allocate_8gpu": lambda: allocate_response(snapshot, ids),
        "preferred_4_of_8": lambda: preferred_allocation(by_id, topology, ids, [], 4),
        "preferred_2_must_include": lambda: preferred_allocation(by_id, topology, ids, [node1], 2),
    }
    out = {}
    for name, fn in cases.items():
        lat = sequential(lambda i, fn=fn: fn(), runs, runs // 10)
        out[name] = round(percentile(lat, 50) * 1e6, 1)
    return out


def sequential(call: Callable[[int], Any], n: int, warmup: int) -> list[float]:
    for i in range(warmup):
        call(i)
    out = [0.0] * n
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        call(i)
        out[i] = clock() - t0
    return out


def concurrent(
    stubs: list[api_pb2_grpc.DevicePluginStub],
    requests: list[api_pb2.AllocateRequest],
    callers: int,
    per_caller: int,
    warmup: int,
) -> tuple[list[float], float]:
    """``callers`` threads each call Allocate ``per_caller`` times, all released together;
    returns every latency and the wall time of the timed phase."""
    barrier = threading.Barrier(callers + 1)
    results: list[list[float]] = [[] for _ in range(callers)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        stub = stubs[k % len(stubs)]
        try:
            for i in range(warmup):
                stub.Allocate(requests[(k + i) % len(requests)], timeout=RPC_TIMEOUT_S)
            barrier.wait()
            lat = results[k]
            clock = time.perf_counter
            for i in range(per_caller):
                req = requests[(k + i) % len(requests)]
                t0 = clock()
                stub.Allocate(req, timeout=RPC_TIMEOUT_S)
                lat.append(clock() - t0)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=(k,), name=f"caller-{k}") for k in range(callers)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return [x for r in results for x in r], wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000, help="sequential calls per RPC kind")
    ap.add_argument(
        "--concurrent-calls",
        type=int,
        default=4000,
        help="calls per concurrency level, split over the callers (default 4000)",
    )
    ap.add_argument("--callers", default="8,32,64", help="concurrency levels (default 8,32,64)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    ap.add_argument(
        "--channel-per-caller",
        action="store_true",
        help="one channel per thread instead of one shared channel",
    )
    args = ap.parse_args()
    levels = [int(x) for x in args.callers.split(",") if x]

    figures: dict[str, float] = {}
    detail: dict[str, Any] = {}
    with running_node("alloc") as node:
        k = node.kubelet
        reg = k.wait_registered(GPU)
        socket = k.plugin_dir / reg.endpoint
        pid = node.gpud.pid
        assert pid is not None
        gpus = sorted(node.gpud.status().gpus, key=lambda g: g.index)
        uuids = [g.uuid for g in gpus]
        node1 = [g.uuid for g in gpus if g.numa_node == 1]
        time.sleep(0.5)  # let start-up work finish

        channel = dial(socket)
        stub = api_pb2_grpc.DevicePluginStub(channel)
        one_gpu = [allocate_request([u]) for u in uuids]
        all_gpus = allocate_request(uuids)
        empty = api_pb2.Empty()

        def timed(name: str, call: Callable[[int], Any]) -> dict[str, Any]:
            ticks0, own0 = cpu_ticks(pid), own_cpu()
            lat = sequential(call, args.runs, args.warmup)
            ticks, own = cpu_ticks(pid) - ticks0, own_cpu() - own0
            calls = args.runs + args.warmup
            s = summary_ms(lat)
            s["gpud_cpu_ms_per_call"] = round(ticks / CLK_TCK * 1000 / calls, 3)
            s["client_cpu_ms_per_call"] = round(own * 1000 / calls, 3)
            detail[name] = s
            log(f"allocate: {name}: p50 {s['p50']} ms p99 {s['p99']} ms")
            return s

        floor = timed(
            "get_device_plugin_options",
            lambda i: stub.GetDevicePluginOptions(empty, timeout=RPC_TIMEOUT_S),
        )
        one = timed(
            "allocate_1gpu_one_caller",
            lambda i: stub.Allocate(one_gpu[i % 8], timeout=RPC_TIMEOUT_S),
        )
        eight = timed(
            "allocate_8gpu_one_caller",
            lambda i: stub.Allocate(all_gpus, timeout=RPC_TIMEOUT_S),
        )
        pref4_req = preferred_request(uuids, [], 4)
        pref4 = timed(
            "preferred_4_of_8",
            lambda i: stub.GetPreferredAllocation(pref4_req, timeout=RPC_TIMEOUT_S),
        )
        pref2_req = preferred_request(uuids, [node1[0]], 2)
        pref2 = timed(
            "preferred_2_must_include",
            lambda i: stub.GetPreferredAllocation(pref2_req, timeout=RPC_TIMEOUT_S),
        )
        figures.update(
            {
                "floor_get_options_p50_ms": floor["p50"],
                "floor_get_options_p99_ms": floor["p99"],
                "allocate_one_caller_p50_ms": one["p50"],
                "allocate_one_caller_p99_ms": one["p99"],
                "allocate_8gpu_one_caller_p50_ms": eight["p50"],
                "preferred_4_of_8_p50_ms": pref4["p50"],
                "preferred_4_of_8_p99_ms": pref4["p99"],
                "preferred_2_must_include_p50_ms": pref2["p50"],
                "preferred_2_must_include_p99_ms": pref2["p99"],
            }
        )

        for callers in levels:
            if args.channel_per_caller:
                channels = [dial(socket) for _ in range(callers)]
            else:
                channels = [channel]
            stubs = [api_pb2_grpc.DevicePluginStub(c) for c in channels]
            per_caller = max(1, args.concurrent_calls // callers)
            ticks0, own0 = cpu_ticks(pid), own_cpu()
            lat, wall = concurrent(stubs, one_gpu, callers, per_caller, warmup=5)
            ticks, own = cpu_ticks(pid) - ticks0, own_cpu() - own0
            s = summary_ms(lat)
            s["calls_per_s"] = round(len(lat) / wall, 1)
            s["gpud_cpu_share"] = round(ticks / CLK_TCK / wall, 3)
            s["client_cpu_share"] = round(own / wall, 3)
            detail[f"allocate_{callers}_callers"] = s
            figures[f"allocate_{callers}_callers_p50_ms"] = s["p50"]
            figures[f"allocate_{callers}_callers_p99_ms"] = s["p99"]
            log(f"allocate: {callers} callers: p50 {s['p50']} ms p99 {s['p99']} ms")
            if args.channel_per_caller:
                for c in channels:
                    c.close()
        channel.close()
    detail["handler_in_process_p50_us"] = handler_costs(args.runs)

    budgets = {
        "allocate_one_caller_p50_ms": 0.4,
        "allocate_8_callers_p99_ms": 1.5,
        "allocate_32_callers_p99_ms": 3.4,
        "preferred_4_of_8_p50_ms": 0.5,
        "preferred_2_must_include_p50_ms": 0.5,
    }
    emit(
        "allocate",
        figures,
        budgets,
        client="python grpc sync",
        channel="one channel per caller" if args.channel_per_caller else "one shared channel",
        runs=args.runs,
        method=(
            "v1beta1 DevicePlugin stub on the plugin socket registered with the fake kubelet; "
            "each call timed with perf_counter; Allocate asks for 1 GPU for one container "
            "(rotating over the 8); GetPreferredAllocation: 4 of 8 available, and 2 with one "
            "NUMA-node-1 GPU in must_include; floor = GetDevicePluginOptions; the reference "
            "figures came from a Go client, this client is Python (its cost is included)"
        ),
        detail=detail,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
