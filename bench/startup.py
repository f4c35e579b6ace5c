"""gpud process start -> every plugin registered with kubelet (budget <= 400 ms for 8 GPUs).

A fake kubelet keeps serving while gpud is started N times (a fresh process each time, same
state directory). t0 is taken just before ``Popen``; the end is ``Registration.at`` of the
``nvidia.com/gpu`` registration that this process made. Each gpud is stopped with SIGTERM
before the next starts.

Each run is done twice: with byte code compiled once and reused (as an installed package
has its .pyc files; the cache lives in the scratch directory, never in the source tree) and with
the environment as inherited, which matters where PYTHONDONTWRITEBYTECODE=1 is set and every
start compiles gpud's sources again. The budget applies to the first.

For context it also measures the interpreter alone (``python -c pass``, the floor no Python
daemon can beat) and, in one extra run under ``PYTHONPROFILEIMPORTTIME=1`` (which inflates
times somewhat; that run is not part of the latency figures), how long gpud's imports take and
which packages they go to.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    GPU,
    REPO,
    Node,
    emit,
    log,
    make_node,
    short_tmp,
    summary_ms,
)
from tests.support.process import GpudProcess

BUDGET_MS = 400.0


def interpreter_floor(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, cwd=REPO)
        out.append(time.monotonic() - t0)
    return out


def parse_importtime(text: str) -> tuple[float, dict[str, float], dict[str, float]]:
    """Total import time (ms), self time per top-level package (ms), self time per module."""
    total_us = 0
    by_package: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3:
            continue
        self_us, cum_us, name = int(parts[0]), int(parts[1]), parts[2][1:]
        depth = (len(name) - len(name.lstrip(" "))) // 2
        name = name.strip()
        by_module[name] = self_us / 1000.0
        if depth == 0:
            total_us += cum_us
        by_package[name.split(".")[0]] += self_us / 1000.0
    return total_us / 1000.0, dict(by_package), by_module


def start_once(node: Node, root: Path, tag: str, env: dict[str, str]) -> tuple[float, GpudProcess]:
    """Start one gpud, wait for its GPU registration (and device list), stop it; return the
    seconds from Popen to Registration.at and the (stopped) process."""
    gpud = GpudProcess(
        node.gpud.simulate,
        node.kubelet.plugin_dir,
        node.gpud.state_dir,
        node.gpud.socket,
        log_dir=root / f"log-{tag}",
        env=env,
    )
    count = len([r for r in node.kubelet.registrations if r.resource == GPU]) + 1
    t0 = time.monotonic()
    gpud.start()
    try:
        reg = node.kubelet.wait_registered(GPU, count=count, timeout=30)
        node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    finally:
        gpud.terminate()
    return reg.at - t0, gpud


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="gpud starts per mode (default 10)")
    ap.add_argument("--kubeconfig", type=Path, help="gpud run --kubeconfig: with the API link on")
    args = ap.parse_args()

    runs: dict[str, list[float]] = {"cached": [], "as_is": []}
    with short_tmp("start") as root:
        # As installed by pip or a package, with byte code compiled once; the prefix keeps the
        # .pyc files out of the source tree. PYTHONDONTWRITEBYTECODE='' means "not set".
        cached = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(root / "pyc")}
        as_is: dict[str, str] = {}
        node = make_node(
            root, extra=("--kubeconfig", str(args.kubeconfig)) if args.kubeconfig else ()
        )
        node.kubelet.start()
        try:
            floor = interpreter_floor(max(3, args.runs))
            start_once(node, root, "warmup", cached)  # fills the byte-code cache; not timed
            for i in range(args.runs):
                for mode, env in (("cached", cached), ("as_is", as_is)):
                    took, _ = start_once(node, root, f"{mode}{i}", env)
                    runs[mode].append(took)
                    log(f"startup: run {i + 1} ({mode}): {took * 1000:.1f} ms")
            profiled_s, gpud = start_once(
                node, root, "profile", {**cached, "PYTHONPROFILEIMPORTTIME": "1"}
            )
            import_ms, by_package, by_module = parse_importtime(gpud.log())
        finally:
            node.kubelet.stop()

    s = summary_ms(runs["cached"])
    a = summary_ms(runs["as_is"])
    f = summary_ms(floor)
    top = sorted(by_package.items(), key=lambda kv: -kv[1])[:12]
    top_modules = sorted(by_module.items(), key=lambda kv: -kv[1])[:12]
    figures = {
        "start_to_registered_p50_ms": s["p50"],
        "start_to_registered_max_ms": s["max"],
        "start_to_registered_no_pyc_p50_ms": a["p50"],
        "interpreter_floor_p50_ms": f["p50"],
        "imports_ms": round(import_ms, 1),
    }
    emit(
        "startup",
        figures,
        {"start_to_registered_p50_ms": BUDGET_MS, "start_to_registered_max_ms": BUDGET_MS},
        runs=args.runs,
        pythondontwritebytecode=os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        method=(
            "t0 before Popen of 'python -m gpud.cli.gpud_main run --simulate dgx-a100'; "
            "end = Registration.at of nvidia.com/gpu at the fake kubelet. "
            "start_to_registered_*: byte code compiled once (PYTHONPYCACHEPREFIX, as an "
            "installed package has its .pyc); *_no_pyc_*: the inherited environment, where "
            "PYTHONDONTWRITEBYTECODE=1 makes every start compile gpud's sources again. "
            "imports_ms from one extra (byte-code cached) run under PYTHONPROFILEIMPORTTIME=1: "
            "sum of top-level cumulative import times, profiling overhead included"
        ),
        detail={
            "start_to_registered_ms": s,
            "start_to_registered_no_pyc_ms": a,
            "interpreter_floor_ms": f,
            "profiled_run_start_to_registered_ms": round(profiled_s * 1000.0, 1),
            "modules_imported": len(by_module),
            "import_self_ms_by_package": {k: round(v, 1) for k, v in top},
            "import_self_ms_top_modules": {k: round(v, 1) for k, v in top_modules},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
