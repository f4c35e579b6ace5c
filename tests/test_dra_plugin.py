"""gpud as the node's DRA driver (allocation.mode: dra), seen from kubelet's side.

A real gpud process on the simulated dgx-a100, kubelet's DRA side as a stand-in that speaks the
real registration and DRA gRPC services over real unix sockets (tests/support/drakubelet.py), and
for claims a real kube-apiserver with the real scheduler and ResourceClaim controller
(tests/support/kubekit.py): the claims Prepare reads are allocated exactly as in a cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.drakubelet import Claim, FakeDraKubelet, wait_for
from tests.support.mignode import MigNode, start, stopped_after

DRIVER = "gpu.nvidia.com"
HEALTHY, UNHEALTHY = 1, 2


def dra_config(root: Path, extra: str = "") -> str:
    return (
        f"version: v1\nallocation:\n  mode: dra\ndra:\n  cdiDir: {root / 'cdi'}\n"
        "kubernetes:\n  enabled: false\n" + extra
    )


@pytest.fixture
def nodes() -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def publisher(node: MigNode, name: str) -> dict[str, Any] | None:
    out = node.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    return next((p for p in json.loads(out.stdout)["publishers"] if p["name"] == name), None)


def test_registers_with_kubelet_and_again_after_kubelet_restarts_or_loses_a_socket(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    kubelet = FakeDraKubelet(short_tmp).start()
    try:
        node = start(short_tmp, "dgx-a100", dra_config(short_tmp))
        nodes.append(node)
        first = kubelet.wait_registered(DRIVER)
        dra_sock = short_tmp / "plugins" / DRIVER / "dra.sock"
        assert first.socket == str(short_tmp / "plugins_registry" / f"{DRIVER}-reg.sock")
        assert first.endpoint == str(dra_sock)
        # v1 first: a 1.34+ kubelet takes it; a 1.32/1.33 one finds v1beta1. Health is optional.
        assert first.versions == (
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth",
        )
        assert first.chosen == "v1.DRAPlugin"
        wait_for(
            lambda: "registered with kubelet" in (publisher(node, "dra") or {}).get("detail", ""),
            10,
            lambda: str(publisher(node, "dra")),
        )
        # DRA mode: nothing through the device-plugin API.
        assert node.kubelet.registrations == []
        assert list((short_tmp / "kubelet").glob("nvidia-*.sock")) == []
        assert publisher(node, "kubelet") is None

        kubelet.restart()
        kubelet.wait_registered(DRIVER, count=2)

        os.unlink(first.socket)  # someone cleans kubelet's registry
        kubelet.wait_registered(DRIVER, count=3)

        os.unlink(dra_sock)  # the service socket lost: served again, registered again
        kubelet.wait_registered(DRIVER, count=4)
        assert dra_sock.is_socket()
        # The re-created service answers (no credentials here: a per-claim error, no crash).
        answer = kubelet.prepare(DRIVER, Claim("default", "c", "uid-1"))
        assert "no credentials" in answer["uid-1"]["error"]
        assert kubelet.rejections == []

        assert node.gpud.terminate() == 0
        kubelet.wait_deregistered(DRIVER)
        assert not Path(first.socket).exists() and not dra_sock.exists()
    finally:
        kubelet.stop()


def test_a_kubelet_that_knows_only_v1beta1_registers_it(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    kubelet = FakeDraKubelet(short_tmp, supported=("v1beta1.DRAPlugin",)).start()
    try:
        nodes.append(start(short_tmp, "dgx-a100", dra_config(short_tmp)))
        assert kubelet.wait_registered(DRIVER).chosen == "v1beta1.DRAPlugin"
        answer = kubelet.prepare(DRIVER, Claim("default", "c", "uid-1"), version="v1beta1")
        assert answer["uid-1"]["error"]
    finally:
        kubelet.stop()


def test_a_restart_in_the_other_mode_withdraws_the_old_api_before_the_new_one_registers(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    """A node switched with allocation.mode and a restart: after a kill -9 (the worst case,
    nothing cleaned up), the mode that starts removes the other API's sockets first."""
    conf = short_tmp / "gpud.yaml"
    kubelet = FakeDraKubelet(short_tmp).start()
    try:
        node = start(short_tmp, "dgx-a100", "version: v1\nkubernetes:\n  enabled: false\n")
        nodes.append(node)
        node.kubelet.wait_registered("nvidia.com/gpu")
        assert status(node)["allocation_mode"] == "device-plugin"
        assert publisher(node, "dra") is None
        node.gpud.kill()
        stale_dp = short_tmp / "kubelet" / "nvidia-gpu.sock"
        assert stale_dp.is_socket()

        paths = conf.read_text().split("paths:", 1)[1]
        conf.write_text(dra_config(short_tmp) + "paths:" + paths)
        node.gpud.start()
        node.gpud.wait_ready()
        kubelet.wait_registered(DRIVER)
        assert not stale_dp.exists()
        log = node.gpud.log()
        assert log.index("removed stale device-plugin socket") < log.index(
            "kubelet registered DRA driver"
        )
        st = status(node)
        assert (st["allocation_mode"], st["dra_driver"]) == ("dra", DRIVER)
        table = node.gpudctl("status").stdout
        assert f"allocation: DRA, driver {DRIVER}" in table
        node.gpud.kill()
        assert kubelet.registered(DRIVER) is not None  # the stale socket is still there

        conf.write_text("version: v1\nkubernetes:\n  enabled: false\npaths:" + paths)
        before = len(node.kubelet.registrations)
        node.gpud.start()
        node.gpud.wait_ready()
        kubelet.wait_deregistered(DRIVER)
        node.kubelet.wait_registered("nvidia.com/gpu", count=2)
        assert len(node.kubelet.registrations) > before
        assert not (short_tmp / "plugins_registry" / f"{DRIVER}-reg.sock").exists()

        # kubelet's stand-in has the registration; gpud's log line for it may come a moment
        # later. The stale DRA socket was removed before it, in this run's part of the log.
        def since_restart() -> str:
            log = node.gpud.log()
            return log[log.rindex("removed stale DRA socket") :]

        wait_for(lambda: "registered with kubelet" in since_restart(), 10, since_restart)
        assert status(node)["allocation_mode"] == "device-plugin"
    finally:
        kubelet.stop()


def status(node: MigNode) -> dict[str, Any]:
    out = node.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_an_xid_on_a_gpu_reaches_kubelets_health_stream_as_unhealthy(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    kubelet = FakeDraKubelet(short_tmp).start()
    try:
        node = start(short_tmp, "dgx-a100", dra_config(short_tmp))
        nodes.append(node)
        found = kubelet.wait_registered(DRIVER)
        assert found.versions[-1] == "v1alpha1.DRAResourceHealth"
        stream = kubelet.watch_health(DRIVER)
        first = next(stream)
        # The complete list, every GPU healthy.
        assert first == {f"gpu-{i}": (HEALTHY, "") for i in range(8)}
        out = node.gpudctl("debug", "inject-xid", "--gpu", "3", "--xid", "79")
        assert out.returncode == 0, out.stderr
        second = next(stream)
        assert second["gpu-3"][0] == UNHEALTHY and "79" in second["gpu-3"][1]
        assert {k: v for k, v in second.items() if k != "gpu-3"} == {
            f"gpu-{i}": (HEALTHY, "") for i in range(8) if i != 3
        }
        stream.close()
    finally:
        kubelet.stop()
