"""Tests of the FakeKubelet harness itself, against a minimal device plugin defined here.

gpud's integration tests trust the fake to behave like kubelet, so its kubelet-like behaviours
(validation, synchronous dial, restart cleanup, disconnect handling) are pinned down here with
a plugin that has no gpud code in it.
"""

from __future__ import annotations

import socket
import stat
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import pytest

from gpud._proto.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.support.kubelet import (
    CHECKPOINT_FILE,
    HEALTHY,
    UNHEALTHY,
    FakeKubelet,
    SeenDevice,
    invalid_resource_name,
)

RESOURCE = "example.com/gpu"


def dev(device_id: str, health: str = HEALTHY, numa: Sequence[int] = (0,)) -> api_pb2.Device:
    return api_pb2.Device(
        ID=device_id,
        health=health,
        topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=n) for n in numa]),
    )


class Plugin(api_pb2_grpc.DevicePluginServicer):
    """A tiny device plugin: serves a socket, streams lists pushed by the test, echoes Allocate."""

    def __init__(self, plugin_dir: Path, endpoint: str, devices: Sequence[api_pb2.Device]) -> None:
        self.plugin_dir = plugin_dir
        self.endpoint = endpoint
        self.options = api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)
        self._cond = threading.Condition()
        self._lists: list[list[api_pb2.Device]] = [list(devices)]
        self._end_generation = 0
        self.streams_started = 0
        self.streams_cancelled = 0
        self._server: grpc.Server | None = None

    # -- test controls
    def serve(self) -> None:
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{self.plugin_dir / self.endpoint}")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def push(self, devices: Sequence[api_pb2.Device]) -> None:
        with self._cond:
            self._lists.append(list(devices))
            self._cond.notify_all()

    def end_streams(self) -> None:
        """Make every open ListAndWatch return normally (the plugin ends the stream)."""
        with self._cond:
            self._end_generation += 1
            self._cond.notify_all()

    def register(
        self, kubelet: FakeKubelet, version: str = "v1beta1", resource: str = RESOURCE
    ) -> None:
        with grpc.insecure_channel(f"unix:{kubelet.socket_path}") as channel:
            api_pb2_grpc.RegistrationStub(channel).Register(
                api_pb2.RegisterRequest(
                    version=version,
                    endpoint=self.endpoint,
                    resource_name=resource,
                    options=self.options,
                ),
                timeout=5,
            )

    # -- DevicePlugin service
    def GetDevicePluginOptions(self, request, context):
        return self.options

    def ListAndWatch(self, request, context):
        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        context.add_callback(wake)
        with self._cond:
            self.streams_started += 1
            generation = self._end_generation
        sent = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(partial(self._stream_ready, sent, generation, context))
                    if not context.is_active() or generation != self._end_generation:
                        return
                    batch, sent = self._lists[sent:], len(self._lists)
                for devices in batch:
                    yield api_pb2.ListAndWatchResponse(devices=devices)
        finally:
            if not context.is_active():
                with self._cond:
                    self.streams_cancelled += 1
                    self._cond.notify_all()

    def _stream_ready(self, sent: int, generation: int, context: grpc.ServicerContext) -> bool:
        return (
            sent < len(self._lists) or generation != self._end_generation or not context.is_active()
        )

    def GetPreferredAllocation(self, request, context):
        responses = []
        for req in request.container_requests:
            picked = list(req.must_include_deviceIDs)
            picked += [d for d in req.available_deviceIDs if d not in picked]
            responses.append(
                api_pb2.ContainerPreferredAllocationResponse(
                    deviceIDs=picked[: req.allocation_size]
                )
            )
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request, context):
        return api_pb2.AllocateResponse(
            container_responses=[
                api_pb2.ContainerAllocateResponse(
                    envs={"TEST_VISIBLE_DEVICES": ",".join(req.devices_ids)}
                )
                for req in request.container_requests
            ]
        )

    def wait_cancelled(self, count: int, timeout: float = 5.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.streams_cancelled >= count, timeout), (
                f"{self.streams_cancelled} streams cancelled, wanted {count}"
            )


@pytest.fixture
def kubelet(short_tmp: Path) -> Iterator[FakeKubelet]:
    with FakeKubelet(short_tmp / "device-plugins", dial_timeout=0.5) as k:
        yield k


@pytest.fixture
def plugin(kubelet: FakeKubelet) -> Iterator[Plugin]:
    p = Plugin(
        kubelet.plugin_dir, "test-gpu.sock", [dev("gpu-0", numa=(0,)), dev("gpu-1", numa=(1,))]
    )
    p.serve()
    yield p
    p.stop()


def test_start_creates_dir_and_socket(kubelet: FakeKubelet) -> None:
    assert stat.S_IMODE(kubelet.plugin_dir.stat().st_mode) & 0o027 == 0
    assert kubelet.socket_path.is_socket()
    assert kubelet.running


def test_register_then_devices_are_visible(kubelet: FakeKubelet, plugin: Plugin) -> None:
    seen_updates: list[tuple[str, float]] = []
    kubelet.on_update = lambda resource, at: seen_updates.append((resource, at))

    plugin.register(kubelet)
    reg = kubelet.wait_registered(RESOURCE)
    assert (reg.version, reg.endpoint, reg.resource) == ("v1beta1", "test-gpu.sock", RESOURCE)
    assert reg.options.get_preferred_allocation_available
    assert reg.requested_options == plugin.options

    devices = kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)
    assert devices["gpu-1"] == SeenDevice("gpu-1", HEALTHY, (1,))
    assert kubelet.allocatable(RESOURCE) == 2
    assert kubelet.connected(RESOURCE)

    plugin.push([dev("gpu-0"), dev("gpu-1", UNHEALTHY, numa=(1,))])
    devices = kubelet.wait_devices(RESOURCE, lambda d: d["gpu-1"].health == UNHEALTHY)
    assert kubelet.updates(RESOURCE) == 2
    assert kubelet.allocatable(RESOURCE) == 1
    assert kubelet.capacity(RESOURCE) == 2
    assert [r for r, _ in seen_updates] == [RESOURCE, RESOURCE]
    assert all(at >= reg.at for _, at in seen_updates)


@pytest.mark.parametrize(
    ("version", "resource", "message"),
    [
        ("v1alpha", RESOURCE, "not supported"),
        ("", RESOURCE, "not supported"),
        ("v1beta1", "gpu", "is invalid"),
        ("v1beta1", "kubernetes.io/gpu", "is invalid"),
    ],
)
def test_bad_registration_is_rejected(
    kubelet: FakeKubelet, plugin: Plugin, version: str, resource: str, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        plugin.register(kubelet, version=version, resource=resource)
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert message in info.value.details()
    assert kubelet.registrations == []
    assert [r.resource for r in kubelet.rejections] == [resource]
    assert plugin.streams_started == 0


@pytest.mark.parametrize(
    ("name", "invalid"),
    [
        ("nvidia.com/gpu", False),
        ("nvidia.com/mig-1g.10gb", False),
        ("nvidia.com/gpu.shared", False),
        ("gpu", True),
        ("kubernetes.io/gpu", True),
        ("foo.kubernetes.io/gpu", True),
        ("requests.nvidia.com/gpu", True),
        ("Nvidia.com/gpu", True),
        ("nvidia.com/", True),
        ("nvidia.com/gpu/x", True),
        ("nvidia.com/" + "g" * 64, True),
    ],
)
def test_extended_resource_name_rules(name: str, invalid: bool) -> None:
    assert invalid_resource_name(name) is invalid


def test_register_without_serving_fails(kubelet: FakeKubelet) -> None:
    """kubelet dials the plugin before answering Register, so an unserved socket is an error."""
    unserved = Plugin(kubelet.plugin_dir, "not-served.sock", [dev("gpu-0")])
    with pytest.raises(grpc.RpcError) as info:
        unserved.register(kubelet)
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    assert "failed to dial" in info.value.details()
    assert kubelet.registrations == []
    assert kubelet.rejections[0].endpoint == "not-served.sock"
    with pytest.raises(AssertionError, match=r"not-served\.sock"):
        kubelet.wait_registered(RESOURCE, timeout=0.05)


def test_restart_removes_sockets_only(kubelet: FakeKubelet, plugin: Plugin) -> None:
    plugin.register(kubelet)
    first = kubelet.wait_registered(RESOURCE)
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)

    plugin_dir = kubelet.plugin_dir
    (plugin_dir / CHECKPOINT_FILE).write_text("{}")
    (plugin_dir / "DEPRECATION").write_text("regular file")
    (plugin_dir / "subdir").mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(plugin_dir / "stale.sock"))
    stale.close()  # the file stays behind, like a crashed plugin's

    kubelet.restart()

    names = sorted(p.name for p in plugin_dir.iterdir())
    assert names == sorted([CHECKPOINT_FILE, "DEPRECATION", "kubelet.sock", "subdir"])
    assert kubelet.socket_path.is_socket()
    plugin.wait_cancelled(1)  # the dying kubelet closed its stream
    assert kubelet.devices(RESOURCE) == {}
    assert kubelet.allocatable(RESOURCE) == 0
    assert not kubelet.connected(RESOURCE)

    # The plugin's socket is gone: it must serve again before it can re-register.
    plugin.stop()
    plugin.serve()
    plugin.register(kubelet)
    second = kubelet.wait_registered(RESOURCE, count=2)
    assert second.at > first.at
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)
    assert kubelet.allocatable(RESOURCE) == 2


def test_stream_end_makes_resource_unallocatable(kubelet: FakeKubelet, plugin: Plugin) -> None:
    plugin.register(kubelet)
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)
    assert kubelet.allocatable(RESOURCE) == 2

    plugin.end_streams()
    kubelet.wait_disconnected(RESOURCE)
    assert kubelet.allocatable(RESOURCE) == 0
    assert kubelet.capacity(RESOURCE) == 2  # devices stay known, just unhealthy
    with pytest.raises(AssertionError, match="no live endpoint"):
        kubelet.stub(RESOURCE)

    plugin.register(kubelet)
    kubelet.wait_registered(RESOURCE, count=2)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 2, timeout=5, what="allocatable")


def test_plugin_server_stop_makes_resource_unallocatable(
    kubelet: FakeKubelet, plugin: Plugin
) -> None:
    plugin.register(kubelet)
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)
    plugin.stop()
    kubelet.wait_disconnected(RESOURCE)
    assert kubelet.allocatable(RESOURCE) == 0


def test_new_registration_replaces_endpoint(kubelet: FakeKubelet, plugin: Plugin) -> None:
    plugin.register(kubelet)
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)

    other = Plugin(kubelet.plugin_dir, "other.sock", [dev("gpu-9")])
    other.serve()
    try:
        other.register(kubelet)
        assert kubelet.wait_registered(RESOURCE, count=2).endpoint == "other.sock"
        plugin.wait_cancelled(1)  # the old stream was closed by kubelet
        kubelet.wait_devices(RESOURCE, lambda d: set(d) == {"gpu-9"})
        plugin.push([dev("gpu-0")])  # the old plugin has no stream left to change anything
        assert kubelet.allocate(RESOURCE, ["gpu-9"]).envs["TEST_VISIBLE_DEVICES"] == "gpu-9"
        assert set(kubelet.devices(RESOURCE)) == {"gpu-9"}
    finally:
        other.stop()


def test_allocate_and_preferred_round_trip(kubelet: FakeKubelet, plugin: Plugin) -> None:
    plugin.register(kubelet)
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)

    response = kubelet.allocate(RESOURCE, ["gpu-0", "gpu-1"])
    assert dict(response.envs) == {"TEST_VISIBLE_DEVICES": "gpu-0,gpu-1"}
    assert kubelet.preferred(RESOURCE, ["gpu-0", "gpu-1"], ["gpu-1"], 1) == ["gpu-1"]

    with pytest.raises(AssertionError, match="unregistered"):
        kubelet.allocate(RESOURCE, ["gpu-7"])
    plugin.push([dev("gpu-0", UNHEALTHY), dev("gpu-1")])
    kubelet.wait_devices(RESOURCE, lambda d: d["gpu-0"].health == UNHEALTHY)
    with pytest.raises(AssertionError, match="unhealthy"):
        kubelet.allocate(RESOURCE, ["gpu-0"])
    assert kubelet.allocate(RESOURCE, ["gpu-7"], validate=False).envs["TEST_VISIBLE_DEVICES"] == (
        "gpu-7"
    )


def test_wait_devices_timeout_reports_last_list(kubelet: FakeKubelet, plugin: Plugin) -> None:
    plugin.register(kubelet)
    kubelet.wait_devices(RESOURCE, lambda d: len(d) == 2)
    with pytest.raises(AssertionError, match="gpu-1"):
        kubelet.wait_devices(RESOURCE, lambda d: len(d) == 3, timeout=0.05)


def test_socket_path_too_long_is_refused(short_tmp: Path) -> None:
    with pytest.raises(ValueError, match="longer than"):
        FakeKubelet(short_tmp / ("x" * 120))
