"""What an idle gpud costs: CPU ticks over a quiet window, RSS and threads at its end
(budget: 0 ticks, RSS <= 60 MiB for the whole of gpud).

gpud runs against a fake kubelet that has registered its GPU plugin and holds the
ListAndWatch stream open, as on a real node. With ``--no-driver`` the simulated node's driver is
not loaded instead: gpud advertises nothing and waits for the driver (kernel uevents, inotify on
its /dev), which must cost nothing either. After a settling pause the bench reads
utime+stime of the gpud process (/proc/<pid>/stat) at the start and at the end of
``--duration`` seconds, and per thread (/proc/<pid>/task/*/stat, names from .../comm) so any
tick can be pinned on a thread. It also reads each thread's exact on-CPU time (schedstat) and
context switches over the window: wake-ups too short to be charged a tick (10 ms at
USER_HZ=100) still show up there. Note the kernel derives the process's ticks from the exact
runtime of all its threads together, so many sub-tick wake-ups spread over several threads can
add up to process ticks while no single thread shows one.
Nothing in the bench process touches gpud during the window.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    CLK_TCK,
    cpu_ticks,
    emit,
    log,
    node_without_driver,
    running_node,
    stat_ticks,
)

RSS_BUDGET_MIB = 60.0


def status_fields(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(value: str) -> float:
    return int(value.split()[0]) / 1024.0


def runtime_ns(task: Path) -> int:
    """Time on CPU (ns, exact) from schedstat; 0 where the kernel does not provide it."""
    try:
        return int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def threads(pid: int) -> dict[str, dict[str, Any]]:
    """Per thread: name, ticks, CPU time (ns), context switches (voluntary + involuntary)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            st = status_fields(task / "status")
            out[task.name] = {
                "name": (task / "comm").read_text().strip(),
                "ticks": stat_ticks(task / "stat"),
                "runtime_ns": runtime_ns(task),
                "switches": int(st["voluntary_ctxt_switches"])
                + int(st["nonvoluntary_ctxt_switches"]),
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="idle window, s (default 60)")
    ap.add_argument("--settle", type=float, default=2.0, help="pause before the window, s")
    ap.add_argument(
        "--no-driver",
        action="store_true",
        help="gpud waiting for a driver that is not loaded, instead of serving 8 GPUs",
    )
    ap.add_argument("--kubeconfig", type=Path, help="gpud run --kubeconfig: with the API link on")
    args = ap.parse_args()

    kube = ("--kubeconfig", str(args.kubeconfig)) if args.kubeconfig else ()
    node_cm = (
        node_without_driver("idle")
        if args.no_driver
        else running_node("idle", setup=lambda _root: kube)
    )
    with node_cm as node:
        pid = node.gpud.pid
        assert pid is not None
        node.gpud._close_channel()  # no control-API connection open during the window
        time.sleep(args.settle)
        before_threads = threads(pid)
        ticks0 = cpu_ticks(pid)
        t0 = time.monotonic()
        log(f"idle: watching gpud (pid {pid}) for {args.duration:g} s")
        time.sleep(args.duration)
        ticks = cpu_ticks(pid) - ticks0
        window = time.monotonic() - t0
        after_threads = threads(pid)
        st = status_fields(Path(f"/proc/{pid}/status"))
        still_connected = node.kubelet.connected("nvidia.com/gpu")
        driver_watch = "waiting for the driver" if args.no_driver else "not running (driver loaded)"

    per_thread = []
    for tid, after in sorted(after_threads.items(), key=lambda kv: int(kv[0])):
        before = before_threads.get(tid, {"ticks": 0, "switches": 0, "runtime_ns": 0})
        per_thread.append(
            {
                "tid": int(tid),
                "name": after["name"],
                "ticks": after["ticks"] - before["ticks"],
                "cpu_ms": round((after["runtime_ns"] - before["runtime_ns"]) / 1e6, 3),
                "switches": after["switches"] - before["switches"],
                "new_in_window": tid not in before_threads,
            }
        )
    gone = [
        {"tid": int(tid), "name": t["name"]}
        for tid, t in before_threads.items()
        if tid not in after_threads
    ]
    busy = [t for t in per_thread if t["ticks"] or t["switches"] or t["cpu_ms"]]
    figures = {
        "ticks": ticks,
        "rss_mib": round(kib(st["VmRSS"]), 1),
        "threads": int(st["Threads"]),
        "cpu_ms": round(sum(t["cpu_ms"] for t in per_thread), 3),
        "wakeups": sum(t["switches"] for t in per_thread),
    }
    emit(
        "idle",
        figures,
        {"ticks": 0, "rss_mib": RSS_BUDGET_MIB},
        duration_s=round(window, 1),
        driver_watch=driver_watch,
        method=(
            "utime+stime of /proc/<gpud pid>/stat before and after the window (USER_HZ="
            f"{CLK_TCK}); VmRSS and Threads from /proc/<pid>/status at its end; cpu_ms = exact "
            "on-CPU time summed over gpud's threads (/proc/<pid>/task/*/schedstat) and "
            "wakeups = their context switches during the window (both unbudgeted)"
        ),
        detail={
            "cpu_s": round(ticks / CLK_TCK, 3),
            "rss_peak_mib": round(kib(st["VmHWM"]), 1),
            "rss_anon_mib": round(kib(st.get("RssAnon", "0 kB")), 1),
            "rss_file_mib": round(kib(st.get("RssFile", "0 kB")), 1),
            "threads_that_ran": busy,
            "threads_gone_in_window": gone,
            "thread_names": sorted({t["name"] for t in per_thread}),
            "kubelet_stream_still_open": still_connected,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
