"""A driver that arrives after gpud started: gpud opens it then, without a restart.

Through the running daemon (``gpud run --simulate``, a fake kubelet on real gRPC): the simulated
node starts with its driver not loaded or not installed (``nvmlInit`` failing as NVML does), then
the test does what the kernel and udev do, loading the driver and creating the control node in
the simulated ``/dev`` gpud watches, and checks that kubelet gets the devices and ``gpudctl``
the GPUs from the same process. The kernel-uevent source is checked against real uevents of this
machine's kernel, and the NVML backend's retries against pynvml over a fake ``libnvidia-ml``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.daemon.driverwatch import DriverWatch, Uevent, announces
from gpud.hw.backend import DriverSignals
from gpud.hw.sim.driver import DriverState, control_node, set_driver
from tests.conftest import unavailable
from tests.support.node import Node, make_node
from tests.support.podresources import FakePodResources

GPU = "nvidia.com/gpu"
WAITING = "no GPU driver yet; waiting for it"


def _wait_for_log(node: Node, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.gpud.log():
        assert node.gpud.running(), node.gpud.log()
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{node.gpud.log()}"
        time.sleep(0.05)


@pytest.fixture
def node_without_driver(short_tmp: Path) -> Iterator[Node]:
    """A dgx-a100 whose driver is not loaded, with kubelet up and gpud started."""
    n = make_node(short_tmp)
    set_driver(n.gpud.state_dir, DriverState.NOT_LOADED)
    n.kubelet.start()
    n.gpud.start()
    try:
        yield n
    finally:
        if n.gpud.running():
            n.gpud.terminate()
        n.kubelet.stop()
        print(n.gpud.log())  # pytest shows it only when the test failed


@pytest.mark.parametrize(
    ("before", "error"),
    [
        (DriverState.NOT_LOADED, "no driver: NVIDIA driver not loaded"),
        (DriverState.NOT_INSTALLED, "no driver: no NVIDIA driver: libnvidia-ml.so.1 not found"),
    ],
)
def test_a_driver_loaded_after_gpud_started_is_used_without_a_restart(
    node_without_driver: Node, before: DriverState, error: str
) -> None:
    n = node_without_driver
    state_dir = n.gpud.state_dir
    set_driver(state_dir, before)
    status = n.gpud.wait_ready()
    assert status.backend_error.startswith(error), status.backend_error
    assert list(status.gpus) == [] and list(status.plugins) == []
    table = n.gpudctl("status")
    assert "no driver" in table.stdout, table.stdout
    _wait_for_log(n, WAITING)
    pid = n.gpud.pid

    set_driver(state_dir, DriverState.LOADED)  # the kernel loads nvidia.ko...
    control_node(state_dir).touch()  # ...and udev creates /dev/nvidiactl

    reg = n.kubelet.wait_registered(GPU, timeout=20)
    assert reg.endpoint == "nvidia-gpu.sock"
    devices = n.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    out = n.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["backend_error"] == ""
    assert {g["uuid"] for g in st["gpus"]} == set(devices)
    assert st["driver_version"]
    assert [p["registered"] for p in st["plugins"]] == [True]
    assert "no driver" not in n.gpudctl("status").stdout
    assert n.gpud.pid == pid and n.gpud.running()


def test_a_sign_that_comes_before_the_driver_is_usable_is_retried(
    node_without_driver: Node,
) -> None:
    """udev may create /dev/nvidiactl a moment before NVML can initialise: the same sign is tried
    again for some seconds, with no further event."""
    n = node_without_driver
    n.gpud.wait_ready()
    _wait_for_log(n, WAITING)

    control_node(n.gpud.state_dir).touch()  # the node first, NVML still refuses...
    _wait_for_log(n, "sign of the GPU driver")
    time.sleep(0.3)
    set_driver(n.gpud.state_dir, DriverState.LOADED)  # ...then the module is ready: no new sign

    n.kubelet.wait_devices(GPU, lambda d: len(d) == 8, timeout=20)
    assert n.gpud.status().backend_error == ""


def test_a_sign_without_a_driver_keeps_gpud_waiting_for_the_next_one(
    node_without_driver: Node,
) -> None:
    n = node_without_driver
    n.gpud.wait_ready()
    _wait_for_log(n, WAITING)
    control_node(n.gpud.state_dir).touch()  # a stale node, the module is not there
    _wait_for_log(n, "but cannot be used: no driver: NVIDIA driver not loaded", timeout=30)
    assert n.gpud.status().backend_error.startswith("no driver")

    control_node(n.gpud.state_dir).unlink()
    set_driver(n.gpud.state_dir, DriverState.LOADED)
    control_node(n.gpud.state_dir).touch()
    n.kubelet.wait_devices(GPU, lambda d: len(d) == 8, timeout=20)


def test_the_configured_mig_layout_is_applied_when_the_driver_arrives(
    short_tmp: Path,
) -> None:
    pod_resources = FakePodResources(short_tmp / "pod-resources.sock").start()  # no pods
    config = short_tmp / "gpud.yaml"
    config.write_text(
        "version: v1\nmig:\n  layout: all-1g.5gb\n"
        f"paths:\n  podResourcesSocket: {pod_resources.socket_path}\n"
    )
    n = make_node(short_tmp, extra=("--config", str(config)))
    set_driver(n.gpud.state_dir, DriverState.NOT_LOADED)
    n.kubelet.start()
    n.gpud.start()
    try:
        assert n.gpud.wait_ready().backend_error.startswith("no driver")
        refused = n.gpudctl("mig", "apply", "-c", "all-1g.5gb", "--dry-run")
        assert refused.returncode != 0 and "no driver" in refused.stderr, refused
        _wait_for_log(n, WAITING)

        set_driver(n.gpud.state_dir, DriverState.LOADED)
        control_node(n.gpud.state_dir).touch()

        mig = "nvidia.com/mig-1g.5gb"
        devices = n.kubelet.wait_devices(mig, lambda d: len(d) == 56, timeout=60)
        assert len(devices) == 56
        code, shown = n.mig("show")
        assert code == 0, shown
        assert all(g["mode"] == "enabled" for g in shown["gpus"])
        assert "layout 'all-1g.5gb' at start: applied" in n.gpud.log()
    finally:
        n.gpud.terminate()
        n.kubelet.stop()
        pod_resources.stop()
        print(n.gpud.log())


# ---- the watch itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "sign"),
    [
        (Uevent("add", "module", "/module/nvidia"), "kernel module nvidia loaded"),
        (
            Uevent("add", "drivers", "/bus/pci/drivers/nvidia"),
            "driver /bus/pci/drivers/nvidia registered",
        ),
        (
            Uevent("bind", "pci", "/devices/pci0000:00/0000:00:1e.0", "nvidia"),
            "/devices/pci0000:00/0000:00:1e.0 bound to nvidia",
        ),
        (Uevent("add", "module", "/module/nvidia_uvm"), None),
        (Uevent("add", "module", "/module/nvidia_modeset"), None),
        (Uevent("add", "drivers", "/bus/pci/drivers/nvidia-nvswitch"), None),
        (Uevent("remove", "module", "/module/nvidia"), None),
        (Uevent("bind", "pci", "/devices/pci0000:00/0000:00:1e.0", "nouveau"), None),
        (Uevent("bind", "pci", "/devices/pci0000:00/0000:00:1e.0", "vfio-pci"), None),
        (Uevent("add", "net", "/devices/virtual/net/veth1"), None),
    ],
)
def test_which_uevents_announce_the_nvidia_driver(event: Uevent, sign: str | None) -> None:
    assert announces(event, "nvidia") == sign


async def _first_sign(watch: DriverWatch, act: object, timeout: float = 10.0) -> str | None:
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.armed.wait(), timeout)
        assert callable(act)
        act()
        return await watch.next(timeout=timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_control_node_appearing_is_a_sign_and_other_nodes_are_not(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    watch = DriverWatch(DriverSignals("nvidia", dev, "nvidiactl"))

    def other_nodes_then_ours() -> None:
        for name in ("nvidia0", "nvidia-uvm", "null"):
            (dev / name).touch()
        (dev / "nvidiactl").touch()

    assert asyncio.run(_first_sign(watch, other_nodes_then_ours)) == f"{dev / 'nvidiactl'} created"


def test_a_real_kernel_uevent_of_the_module_s_driver_is_a_sign(tmp_path: Path) -> None:
    """The kernel emits a uevent for a driver when "add" is written to its uevent file; the watch
    receives it over its netlink socket as it would nvidia's at modprobe."""
    drivers = sorted(p for p in Path("/sys/bus/pci/drivers").glob("*/uevent"))
    if not drivers or os.geteuid() != 0:
        unavailable("needs root and a PCI driver in /sys/bus/pci/drivers to emit a uevent")
    driver = drivers[0].parent.name
    watch = DriverWatch(DriverSignals(driver, tmp_path, "nvidiactl"))

    sign = asyncio.run(_first_sign(watch, lambda: drivers[0].write_text("add")))

    assert sign == f"driver /bus/pci/drivers/{driver} registered"
