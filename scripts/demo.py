"""Walks through what gpud does for kubelet, on a simulated GPU node, and says what it sees.

It starts ``gpud run --simulate …`` as a real process and plays kubelet's device manager
(tests/support/kubelet.py) against it: registration, the device list, a topology-aware
preferred allocation, an allocation, an XID error taking one GPU out of service, the operator
putting it back, a kubelet restart, and MIG partitioning with a layout change. Everything
happens over real unix sockets in a temporary directory; nothing on the machine is changed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.kubelet import UNHEALTHY, FakeKubelet  # noqa: E402
from tests.support.podresources import FakePodResources  # noqa: E402
from tests.support.process import GpudProcess  # noqa: E402

GPU = "nvidia.com/gpu"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def gpudctl(sock: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(sock), *args]
    print("$ gpudctl " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--simulate", default="dgx-a100", help="simulated machine")
    parser.add_argument(
        "--keep", action="store_true", help="leave gpud running until Ctrl-C at the end"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="gpud-demo-", dir="/tmp"))
    kubelet = FakeKubelet(root / "kubelet")
    # kubelet's PodResources API, which gpud asks before it destroys MIG instances.
    podres = FakePodResources(root / "pod-resources" / "kubelet.sock")
    (root / "gpud.yaml").write_text(
        f"version: v1\npaths:\n  podResourcesSocket: {podres.socket_path}\n"
    )
    gpud = GpudProcess(
        args.simulate,
        root / "kubelet",
        root / "state",
        root / "gpud.sock",
        ("--config", str(root / "gpud.yaml")),
        log_dir=root,
    )
    try:
        say(f"starting a kubelet stand-in in {kubelet.plugin_dir}")
        kubelet.start()
        podres.start()
        say(f"starting: {' '.join(gpud.argv[1:])}")
        t0 = time.monotonic()
        gpud.start()
        reg = kubelet.wait_registered(GPU)
        print(f"registered {reg.resource} at {reg.endpoint} ({(reg.at - t0) * 1000:.0f} ms)")
        gpudctl(gpud.socket, "status")

        devices = kubelet.wait_devices(GPU, lambda d: len(d) > 0)
        ids = sorted(devices)
        say(f"kubelet sees {len(devices)} healthy {GPU} devices")
        if len(ids) >= 4:
            four = kubelet.preferred(GPU, ids, size=4)
            say("kubelet asks for the best 4 GPUs (NVLink- and NUMA-aware):")
            print("\n".join(f"  {u} NUMA {devices[u].numa_nodes}" for u in four))
        resp = kubelet.allocate(GPU, ids[:2])
        say("kubelet allocates 2 GPUs to a container; the runtime is told:")
        for key, value in resp.envs.items():
            print(f"  {key}={value}")

        say("GPU 1 raises XID 79 (fallen off the bus)")
        gpudctl(gpud.socket, "debug", "inject-xid", "--gpu", "1", "--xid", "79")
        bad = gpud.status().gpus[1].uuid
        kubelet.wait_devices(GPU, lambda d: d[bad].health == UNHEALTHY)
        print(f"kubelet now counts {kubelet.allocatable(GPU)} allocatable GPUs")
        gpudctl(gpud.socket, "devices")

        say("after the repair, the operator returns it to service")
        gpudctl(gpud.socket, "device", "set-healthy", bad)
        kubelet.wait_devices(GPU, lambda d: d[bad].health != UNHEALTHY)
        print(f"kubelet now counts {kubelet.allocatable(GPU)} allocatable GPUs")

        say("kubelet restarts (its sockets are wiped); gpud registers again")
        t0 = time.monotonic()
        kubelet.restart()
        reg = kubelet.wait_registered(GPU, count=2)
        print(f"re-registered {(reg.at - t0) * 1000:.1f} ms after kubelet began its restart")

        if any(g.mig_mode != "unsupported" for g in gpud.status().gpus):
            say("the operator partitions every GPU with MIG (mig-parted's all-1g.5gb layout)")
            gpudctl(gpud.socket, "mig", "apply", "-c", "all-1g.5gb")
            mig = kubelet.wait_devices("nvidia.com/mig-1g.5gb", lambda d: len(d) > 0)
            print(f"kubelet now sees {len(mig)} nvidia.com/mig-1g.5gb devices, no restart")
            say("applying it again changes nothing")
            gpudctl(gpud.socket, "mig", "apply", "-c", "all-1g.5gb")
            say("moving to all-balanced keeps the instances that can stay")
            gpudctl(gpud.socket, "mig", "apply", "-c", "all-balanced")
            gpudctl(gpud.socket, "mig", "show")

        if args.keep:
            say(f"gpud keeps running: gpudctl --socket {gpud.socket} status; Ctrl-C to stop")
            try:
                while gpud.running():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        say("SIGTERM: gpud withdraws its plugins and removes its sockets")
        code = gpud.terminate()
        left = sorted(p.name for p in kubelet.plugin_dir.iterdir() if p.name != "kubelet.sock")
        print(f"gpud exited {code}; sockets left in the kubelet directory: {left or 'none'}")
        return code
    except Exception:
        print(gpud.log(), file=sys.stderr)
        raise
    finally:
        if gpud.running():
            gpud.kill()
        kubelet.stop()
        podres.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
