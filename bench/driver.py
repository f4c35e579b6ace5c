"""A driver that loads after gpud started -> plugins registered with kubelet (no budget; for
context, DESIGN.md gives a whole process start <= 400 ms).

``--runs`` (default 10) times: a fresh gpud on a simulated dgx-a100 whose driver is not loaded
(``gpud.hw.sim.driver``), a fake kubelet serving, and gpud waiting for the driver (its watch
armed). The bench then does what modprobe and udev do: the simulated driver is marked loaded,
and t0 is taken just before the control node is created in the simulated /dev, the sign gpud
reacts to. The end is ``Registration.at`` of ``nvidia.com/gpu`` (stamped when kubelet receives
``Register``), and, for ``to_devices``, the fake kubelet's stamp of the first ListAndWatch message
listing all 8 GPUs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GPU, emit, log, node_without_driver, summary_ms
from gpud.hw.sim.driver import DriverState, control_node, set_driver


def one_run() -> tuple[float, float]:
    with node_without_driver("driver") as node:
        listed = threading.Event()
        stamps: list[float] = []

        def on_update(resource: str, at: float) -> None:
            if resource == GPU and not listed.is_set() and len(node.kubelet.devices(GPU)) == 8:
                stamps.append(at)
                listed.set()

        node.kubelet.on_update = on_update
        state_dir = node.gpud.state_dir
        set_driver(state_dir, DriverState.LOADED)
        t0 = time.monotonic()
        control_node(state_dir).touch()
        reg = node.kubelet.wait_registered(GPU, timeout=30)
        if not listed.wait(30):
            raise RuntimeError("kubelet never got the 8 GPUs")
        return reg.at - t0, stamps[0] - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="fresh gpud processes (default 10)")
    args = ap.parse_args()

    registered, devices = [], []
    for run in range(args.runs):
        to_registered, to_devices = one_run()
        registered.append(to_registered)
        devices.append(to_devices)
        log(f"driver: run {run + 1}/{args.runs}: registered after {to_registered * 1000:.1f} ms")
    reg, dev = summary_ms(registered), summary_ms(devices)
    emit(
        "driver",
        {
            "sign_to_registered_p50_ms": reg["p50"],
            "sign_to_registered_max_ms": reg["max"],
            "sign_to_devices_p50_ms": dev["p50"],
        },
        {},
        runs=args.runs,
        method=(
            "fresh gpud per run, simulated driver not loaded, watch armed; t0 before creating "
            "the control node in the simulated /dev (inotify sign); end = Registration.at of "
            "nvidia.com/gpu, and the fake kubelet's on_update stamp of the first list of 8 GPUs"
        ),
        detail={"sign_to_registered": reg, "sign_to_devices": dev},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
