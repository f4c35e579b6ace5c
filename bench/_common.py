"""Shared plumbing for the benchmark scripts: a simulated node, percentiles, the JSON report.

Not a benchmark itself. Every script inserts the repository root into ``sys.path`` and imports
this module as ``bench._common``; the test harness (FakeKubelet, GpudProcess) comes from
``tests.support``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.kubelet import FakeKubelet  # noqa: E402
from tests.support.process import GpudProcess  # noqa: E402

GPU = "nvidia.com/gpu"
SPEC = "dgx-a100"
MACHINE = "dgx-a100 (simulated, 8 GPUs)"


def host() -> dict[str, Any]:
    """What the figures were taken on; latencies only compare across equal hosts."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "cpus": usable,
        "loadavg_at_end": load,
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest value with at least ``pct`` % at or below it)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float], pcts: Sequence[float] = (50, 95, 99)) -> dict[str, Any]:
    """p50/p95/p99/max/min/mean of durations given in seconds, in milliseconds (3 decimals)."""
    ms = [s * 1000.0 for s in seconds]
    out: dict[str, Any] = {"n": len(ms)}
    for p in pcts:
        out[f"p{p:g}"] = round(percentile(ms, p), 3)
    out["min"] = round(min(ms), 3) if ms else math.nan
    out["max"] = round(max(ms), 3) if ms else math.nan
    out["mean"] = round(sum(ms) / len(ms), 3) if ms else math.nan
    return out


def within(figures: Mapping[str, Any], budgets: Mapping[str, float]) -> dict[str, bool]:
    """``figure <= budget`` for every budget; the verdict is informational, never an exit code."""
    return {k: bool(figures[k] <= v) for k, v in budgets.items() if k in figures}


def emit(
    bench: str, figures: Mapping[str, Any], budgets: Mapping[str, float], **extra: Any
) -> None:
    """Print the one JSON object a benchmark produces (one line, to stdout)."""
    report: dict[str, Any] = {
        "bench": bench,
        "machine": MACHINE,
        "host": host(),
        **extra,
        "figures": dict(figures),
        "budgets": dict(budgets),
        "within_budget": within(figures, budgets),
    }
    print(json.dumps(report, sort_keys=False), flush=True)


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays one JSON object."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def short_tmp(prefix: str) -> Iterator[Path]:
    """A scratch directory directly under /tmp: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix=f"gb-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Node:
    """One simulated node: a fake kubelet and a gpud process sharing a scratch directory."""

    root: Path
    kubelet: FakeKubelet
    gpud: GpudProcess

    def stop(self) -> None:
        if self.gpud.running():
            try:
                self.gpud.terminate()
            except AssertionError as exc:  # did not honour SIGTERM; already killed
                log(str(exc).splitlines()[0])
        self.kubelet.stop()


def make_node(root: Path, spec: str = SPEC, extra: Sequence[str] = ()) -> Node:
    """``extra``: more arguments for ``gpud run`` (``--config FILE``)."""
    kubelet = FakeKubelet(root / "k")
    gpud = GpudProcess(
        spec, root / "k", root / "state", root / "gpud.sock", extra, log_dir=root / "log"
    )
    return Node(root, kubelet, gpud)


@contextlib.contextmanager
def running_node(
    prefix: str,
    *,
    devices: int = 8,
    setup: Callable[[Path], Sequence[str]] | None = None,
) -> Iterator[Node]:
    """Fake kubelet up, gpud started and ready, the GPU plugin registered with ``devices``
    devices listed; everything torn down (and the directory removed) afterwards.

    ``setup``, if given, is called with the scratch directory before gpud starts (to write a
    config file) and returns extra arguments for ``gpud run``."""
    with short_tmp(prefix) as root:
        node = make_node(root, extra=setup(root) if setup else ())
        node.kubelet.start()
        try:
            node.gpud.start()
            node.gpud.wait_ready()
            node.kubelet.wait_registered(GPU)
            node.kubelet.wait_devices(GPU, lambda d: len(d) == devices)
            yield node
        except BaseException:
            if node.gpud.running():
                log("gpud log tail:\n" + node.gpud.log()[-3000:])
            raise
        finally:
            node.stop()


WAITING_FOR_DRIVER = "no GPU driver yet; waiting for it"


@contextlib.contextmanager
def node_without_driver(prefix: str, timeout: float = 30.0) -> Iterator[Node]:
    """Fake kubelet up, gpud started on a dgx-a100 whose driver is not loaded
    (:mod:`gpud.hw.sim.driver`), yielded once gpud logs that it waits for the driver (its watch is
    armed); everything torn down afterwards."""
    from gpud.hw.sim.driver import DriverState, set_driver

    with short_tmp(prefix) as root:
        node = make_node(root)
        set_driver(node.gpud.state_dir, DriverState.NOT_LOADED)
        node.kubelet.start()
        try:
            node.gpud.start()
            node.gpud.wait_ready()
            deadline = time.monotonic() + timeout
            while WAITING_FOR_DRIVER not in node.gpud.log():
                if time.monotonic() > deadline or not node.gpud.running():
                    raise RuntimeError(f"gpud is not waiting for the driver:\n{node.gpud.log()}")
                time.sleep(0.02)
            yield node
        except BaseException:
            if node.gpud.running():
                log("gpud log tail:\n" + node.gpud.log()[-3000:])
            raise
        finally:
            node.stop()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_ticks(stat_path: str | Path) -> int:
    """utime + stime (clock ticks) from a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file."""
    text = Path(stat_path).read_text()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_ticks(pid: int) -> int:
    return stat_ticks(f"/proc/{pid}/stat")
