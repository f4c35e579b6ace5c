"""gpud as a real process, driven the way kubelet and an operator drive it.

Each test starts ``gpud run --simulate …`` and a fake kubelet that speaks real gRPC on real unix
sockets (tests/support/kubelet.py), then checks what kubelet and gpudctl would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.kubelet import HEALTHY, UNHEALTHY
from tests.support.node import Node, make_node
from tests.support.process import GpudProcess
from tests.support.unprivileged import readable_client

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"


@pytest.fixture
def node(short_tmp: Path) -> Iterator[Node]:
    n = make_node(short_tmp)
    n.kubelet.start()
    n.gpud.start()
    n.gpud.wait_ready()
    try:
        yield n
    finally:
        if n.gpud.running():
            n.gpud.terminate()
        n.kubelet.stop()
        print(n.gpud.log())  # pytest shows it only when the test failed


def test_registers_and_lists_every_gpu_with_its_numa_node(node: Node) -> None:
    reg = node.kubelet.wait_registered(GPU)
    assert (reg.version, reg.endpoint, reg.resource) == ("v1beta1", "nvidia-gpu.sock", GPU)
    assert reg.options.get_preferred_allocation_available
    assert not reg.options.pre_start_required

    devices = node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    status = node.gpud.status()
    assert set(devices) == {g.uuid for g in status.gpus}
    for gpu in status.gpus:
        assert devices[gpu.uuid].health == HEALTHY
        assert devices[gpu.uuid].numa_nodes == ((0,) if gpu.index < 4 else (1,))
    assert node.kubelet.allocatable(GPU) == 8


def test_allocate_returns_the_uuids_and_rejects_bad_ids_without_dying(node: Node) -> None:
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    uuids = node.uuids()

    resp = node.kubelet.allocate(GPU, [uuids[2], uuids[5]])
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == f"{uuids[2]},{uuids[5]}"

    bogus = "GPU-00000000-0000-0000-0000-000000000000"
    with pytest.raises(grpc.RpcError) as err:
        node.kubelet.allocate(GPU, [uuids[0], bogus], validate=False)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bogus in err.value.details()

    # The server is still there and still right.
    assert node.kubelet.allocate(GPU, [uuids[7]]).envs["NVIDIA_VISIBLE_DEVICES"] == uuids[7]
    assert node.gpud.running()


def test_preferred_allocation_packs_one_numa_node(node: Node) -> None:
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    gpus = {g.uuid: g for g in node.gpud.status().gpus}
    everything = list(gpus)

    four = node.kubelet.preferred(GPU, everything, size=4)
    assert len(set(four)) == 4
    assert len({gpus[u].numa_node for u in four}) == 1

    # kubelet passes devices it already chose in must_include; they stay, and the rest follow
    # them onto their NUMA node.
    on_node1 = [u for u in everything if gpus[u].numa_node == 1]
    two = node.kubelet.preferred(GPU, everything, must_include=[on_node1[0]], size=2)
    assert on_node1[0] in two
    assert {gpus[u].numa_node for u in two} == {1}


def test_kubelet_restarts_twenty_times_and_gpud_registers_every_time(node: Node) -> None:
    node.kubelet.wait_registered(GPU)
    for attempt in range(2, 22):
        node.kubelet.restart()
        reg = node.kubelet.wait_registered(GPU, count=attempt, timeout=10)
        assert reg.endpoint == "nvidia-gpu.sock"
        devices = node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
        assert all(d.health == HEALTHY for d in devices.values())
    assert node.gpud.status().plugins[0].registered


def test_kubelet_absent_for_a_while_then_back(short_tmp: Path) -> None:
    n = make_node(short_tmp)
    n.gpud.start()  # no kubelet, not even its directory
    try:
        status = n.gpud.wait_ready()
        assert not status.kubelet_connected
        assert not any(p.registered for p in status.plugins)
        n.kubelet.start()  # creates the directory and kubelet.sock
        n.kubelet.wait_registered(GPU)
        n.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
        n.kubelet.stop()  # kubelet goes away...
        n.kubelet.start()  # ...and comes back
        n.kubelet.wait_registered(GPU, count=2)
    finally:
        n.gpud.terminate()
        n.kubelet.stop()


def test_critical_xid_marks_exactly_that_gpu_unhealthy_until_set_healthy(node: Node) -> None:
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    uuids = node.uuids()

    out = node.gpudctl("debug", "inject-xid", "--gpu", "3", "--xid", "79")
    assert out.returncode == 0, out.stderr
    devices = node.kubelet.wait_devices(GPU, lambda d: d[uuids[3]].health == UNHEALTHY)
    assert [u for u, d in devices.items() if d.health == UNHEALTHY] == [uuids[3]]
    assert node.kubelet.allocatable(GPU) == 7
    gpu3 = node.gpud.status().gpus[3]
    assert (gpu3.health, gpu3.health_reason) == ("Unhealthy", "critical XID 79")

    with pytest.raises(grpc.RpcError) as err:
        node.kubelet.allocate(GPU, [uuids[3]], validate=False)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert uuids[3] in err.value.details()

    out = node.gpudctl("device", "set-healthy", uuids[3])
    assert out.returncode == 0, out.stderr
    node.kubelet.wait_devices(GPU, lambda d: all(x.health == HEALTHY for x in d.values()))
    assert node.kubelet.allocatable(GPU) == 8


def test_application_xid_is_ignored(node: Node) -> None:
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    updates = node.kubelet.updates(GPU)
    out = node.gpudctl("debug", "inject-xid", "--gpu", "1", "--xid", "13")
    assert out.returncode == 0, out.stderr
    assert "ignored" in out.stdout
    assert node.gpud.status().gpus[1].health == "Healthy"
    assert node.kubelet.updates(GPU) == updates  # nothing changed, nothing was sent


def test_lost_gpu_goes_unhealthy_and_cannot_be_declared_healthy(node: Node) -> None:
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    uuid = node.uuids()[6]
    assert node.gpudctl("debug", "inject-gpu-lost", "--gpu", "6").returncode == 0
    node.kubelet.wait_devices(GPU, lambda d: d[uuid].health == UNHEALTHY)
    out = node.gpudctl("device", "set-healthy", uuid)
    assert out.returncode == 1
    assert "reset it or reboot" in out.stderr


def test_set_healthy_of_an_unknown_uuid_is_invalid_input(node: Node) -> None:
    out = node.gpudctl("device", "set-healthy", "GPU-nope")
    assert out.returncode == 2
    assert "GPU-nope" in out.stderr and "gpudctl devices" in out.stderr


def test_non_root_can_read_but_not_change(node: Node) -> None:
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    node.root.chmod(0o755)  # as /run/gpud is: the socket's own mode and group decide
    read = node.gpudctl("status", "-o", "json", user=65534)
    assert read.returncode == 0, read.stderr
    assert len(json.loads(read.stdout)["gpus"]) == 8

    uuid = node.uuids()[0]
    for args in (
        ("device", "set-healthy", uuid),
        ("debug", "inject-xid", "--gpu", "0", "--xid", "79"),
        ("config", "reload"),
    ):
        out = node.gpudctl(*args, user=65534)
        assert out.returncode == 1, args
        assert "needs root" in out.stderr and "sudo" in out.stderr
    assert node.gpud.status().gpus[0].health == "Healthy"

    # The same call through a plain stub shows the status code scripts see.
    script = (
        "import grpc,sys\n"
        "from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc\n"
        f"ch = grpc.insecure_channel('unix:{node.gpud.socket}')\n"
        "try:\n"
        "    gpud_pb2_grpc.GpudStub(ch).InjectXid(gpud_pb2.InjectXidRequest(gpu_index=0, xid=79))\n"
        "except grpc.RpcError as e:\n"
        "    print(e.code().name)\n"
    )
    client = readable_client()
    code = subprocess.run(
        client.argv(65534, "-c", script),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=client.env,
        cwd="/",
    )
    assert code.stdout.strip() == "PERMISSION_DENIED", code.stderr


def test_status_json_contract(node: Node) -> None:
    node.kubelet.wait_registered(GPU)
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    out = node.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert len(st["gpus"]) == 8
    gpu = st["gpus"][4]
    assert gpu["index"] == 4
    assert gpu["uuid"].startswith("GPU-")
    assert gpu["name"] == "NVIDIA A100-SXM4-40GB"
    assert gpu["memory_mib"] == 40960
    assert gpu["numa_node"] == 1
    assert gpu["health"] == "Healthy"
    assert gpu["mig_mode"] == "disabled"
    (plugin,) = st["plugins"]
    assert plugin["resource"] == GPU
    assert plugin["socket"] == str(node.kubelet.plugin_dir / "nvidia-gpu.sock")
    assert plugin["registered"] is True
    assert (plugin["devices"], plugin["healthy"]) == (8, 8)
    publishers = {p["name"]: p for p in st["publishers"]}
    assert list(publishers) == ["control-api", "kubelet", "labels", "metrics", "kubernetes"]
    assert {p["state"] for p in publishers.values()} == {"ok"}
    assert publishers["control-api"]["detail"] == str(node.gpud.socket)
    assert publishers["metrics"]["detail"].startswith("serving /metrics on 127.0.0.1:")
    assert publishers["kubelet"]["since"] and publishers["kubelet"]["next_retry"] is None

    table = node.gpudctl("status")
    assert table.returncode == 0
    assert "NVIDIA A100-SXM4-40GB" in table.stdout and "nvidia.com/gpu" in table.stdout
    assert node.gpudctl("devices", "-o", "yaml").stdout.startswith("- index: 0")


def test_sigterm_withdraws_plugins_and_removes_sockets(node: Node) -> None:
    node.kubelet.wait_registered(GPU)
    plugin_socket = node.kubelet.plugin_dir / "nvidia-gpu.sock"
    assert plugin_socket.is_socket() and node.gpud.socket.is_socket()
    assert node.gpud.terminate() == 0
    assert not plugin_socket.exists()
    assert not node.gpud.socket.exists()
    node.kubelet.wait_disconnected(GPU)
    assert node.kubelet.allocatable(GPU) == 0


def test_uuids_are_stable_across_restarts(node: Node) -> None:
    node.kubelet.wait_registered(GPU)
    before = node.uuids()
    assert node.gpud.terminate() == 0
    node.gpud.start()
    node.gpud.wait_ready()
    assert node.uuids() == before
    node.kubelet.wait_registered(GPU, count=2)


def test_a_second_gpud_on_the_same_socket_refuses_to_start(node: Node) -> None:
    other = GpudProcess(
        "dgx-a100",
        node.root / "kubelet",
        node.root / "state",
        node.gpud.socket,
        log_dir=node.root / "log2",
    )
    other.start()
    code = other._require_proc().wait(timeout=30)
    assert code == 1
    assert "already served" in other.log()
    assert node.gpud.status().gpus  # the first one is untouched


def test_sighup_reloads_health_settings_and_survives_a_bad_file(short_tmp: Path) -> None:
    config = short_tmp / "gpud.yaml"
    config.write_text("version: v1\n")
    n = make_node(short_tmp, extra=("--config", str(config)))
    n.kubelet.start()
    n.gpud.start()
    try:
        n.gpud.wait_ready()
        n.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
        config.write_text("version: v1\nhealth:\n  extraIgnoredXids: [79]\n")
        assert n.gpudctl("config", "reload").returncode == 0
        out = n.gpudctl("debug", "inject-xid", "--gpu", "2", "--xid", "79")
        assert "ignored" in out.stdout, out.stdout + out.stderr

        config.write_text("version: v1\nhealth:\n  ignoredXids: [oops]\n")
        os.kill(n.gpud.pid or 0, signal.SIGHUP)
        bad = n.gpudctl("config", "reload")
        assert bad.returncode == 2
        assert "health.ignoredXids[0]" in bad.stderr
        assert n.gpud.running()
        assert n.gpud.status().gpus[2].health == "Healthy"
    finally:
        n.gpud.terminate()
        n.kubelet.stop()


def test_no_driver_is_reported_and_the_daemon_keeps_running(short_tmp: Path) -> None:
    n = make_node(short_tmp, extra=("--backend", "nvml"))
    n.kubelet.start()
    n.gpud.start()
    try:
        status = n.gpud.wait_ready()
        assert status.backend == "nvml"
        assert status.backend_error.startswith("no driver")
        assert list(status.gpus) == [] and list(status.plugins) == []
        out = n.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "79")
        assert out.returncode == 1
        assert "simulated backend" in out.stderr
        assert n.gpud.running()
    finally:
        assert n.gpud.terminate() == 0
        n.kubelet.stop()


def test_gpudctl_without_a_daemon_says_what_to_do(short_tmp: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpud.cli.gpudctl",
            "--socket",
            str(short_tmp / "no.sock"),
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "cannot reach gpud" in out.stderr and "systemctl status gpud" in out.stderr


def test_bad_simulate_spec_and_bad_config_exit_2(short_tmp: Path) -> None:
    base = [
        sys.executable,
        "-m",
        "gpud.cli.gpud_main",
        "run",
        "--kubelet-dir",
        str(short_tmp / "k"),
        "--state-dir",
        str(short_tmp / "s"),
        "--socket",
        str(short_tmp / "g.sock"),
    ]
    bad_spec = subprocess.run(
        [*base, "--simulate", "dgx-z9"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad_spec.returncode == 2
    assert "dgx-a100" in bad_spec.stderr  # names the machines that exist

    config = short_tmp / "bad.yaml"
    config.write_text(
        "version: v1\ndevicePlugin:\n  deviceListStrategy: [envvar, carrier-pigeon]\n"
    )
    bad_cfg = subprocess.run(
        [*base, "--simulate", "t4x1", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad_cfg.returncode == 2
    assert "devicePlugin.deviceListStrategy[1]" in bad_cfg.stderr


def test_bad_injection_targets_are_invalid_input(node: Node) -> None:
    for args, needle in (
        (("--gpu", "99", "--xid", "79"), "99"),
        (("--gpu", "0", "--xid", "0"), "xid"),
    ):
        out = node.gpudctl("debug", "inject-xid", *args)
        assert out.returncode == 2, out.stdout
        assert needle in out.stderr.lower()
    assert all(g.health == "Healthy" for g in node.gpud.status().gpus)


def test_malformed_kubelet_requests_get_invalid_argument(node: Node) -> None:
    from gpud._proto.deviceplugin.v1beta1 import api_pb2

    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    uuids = node.uuids()
    stub = node.kubelet.stub(GPU)

    def preferred(available: list[str], must: list[str], size: int) -> grpc.RpcError:
        req = api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
                )
            ]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPreferredAllocation(req, timeout=5)
        return err.value

    assert preferred(uuids, [], 0).code() is grpc.StatusCode.INVALID_ARGUMENT
    err = preferred(uuids[:2], [uuids[5]], 2)  # must_include outside available
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and uuids[5] in err.details()
    for ids in ([], [uuids[0], uuids[0]]):
        with pytest.raises(grpc.RpcError) as alloc:
            node.kubelet.allocate(GPU, ids, validate=False)
        assert alloc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert node.kubelet.allocate(GPU, [uuids[1]]).envs["NVIDIA_VISIBLE_DEVICES"] == uuids[1]


def test_a_dead_kubelet_socket_does_not_stop_registration_later(short_tmp: Path) -> None:
    import socket

    n = make_node(short_tmp)
    n.kubelet.plugin_dir.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(n.kubelet.plugin_dir / "kubelet.sock"))
    dead.close()  # a kubelet.sock nobody answers on: kubelet crashed
    n.gpud.start()
    try:
        n.gpud.wait_ready()
        assert not n.gpud.status().plugins[0].registered
        n.kubelet.start()  # kubelet comes back: wipes sockets, serves kubelet.sock
        n.kubelet.wait_registered(GPU, timeout=5)
        n.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    finally:
        n.gpud.terminate()
        n.kubelet.stop()


def test_sighup_applies_a_good_file(short_tmp: Path) -> None:
    import time

    config = short_tmp / "gpud.yaml"
    config.write_text("version: v1\n")
    n = make_node(short_tmp, extra=("--config", str(config)))
    n.kubelet.start()
    n.gpud.start()
    try:
        n.gpud.wait_ready()
        config.write_text("version: v1\nhealth:\n  extraIgnoredXids: [94]\n")
        os.kill(n.gpud.pid or 0, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in n.gpud.log():
            assert time.monotonic() < deadline, n.gpud.log()
            time.sleep(0.05)
        out = n.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "94")
        assert "ignored" in out.stdout
    finally:
        n.gpud.terminate()
        n.kubelet.stop()
