"""gpudctl's rendering and the control socket's credential check, in process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import grpc
import pytest
import yaml

from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc
from gpud.cli import output
from gpud.daemon.gateway import Gateway, SocketInUse, peer_uid


def status() -> gpud_pb2.Status:
    return gpud_pb2.Status(
        version="0.1.0",
        backend="sim",
        gpus=[
            gpud_pb2.Gpu(
                index=0,
                uuid="GPU-a",
                name="Tesla T4",
                memory_mib=15360,
                numa_node=-1,
                health="Unhealthy",
                health_reason="critical XID 79",
                mig_mode="unsupported",
            )
        ],
        plugins=[
            gpud_pb2.Plugin(
                resource="nvidia.com/gpu",
                socket="/k/nvidia-gpu.sock",
                registered=True,
                devices=1,
                healthy=0,
            )
        ],
        publishers=[
            gpud_pb2.Publisher(name="control-api", state="ok", since_unix=NOW - 300),
            gpud_pb2.Publisher(
                name="labels",
                state="degraded",
                since_unix=NOW - 42,
                error="features.d is missing",
                failures=3,
                retry_at_unix=NOW + 8,
                detail="/etc/kubernetes/node-feature-discovery/features.d",
            ),
        ],
    )


NOW = 1_760_000_000.0


def test_status_lists_every_publisher_and_says_why_one_is_degraded() -> None:
    data = output.status_dict(status())
    assert data["publishers"][1] == {
        "name": "labels",
        "state": "degraded",
        "since": "2025-10-09T08:52:38+00:00",
        "error": "features.d is missing",
        "failures": 3,
        "next_retry": "2025-10-09T08:53:28+00:00",
        "detail": "/etc/kubernetes/node-feature-discovery/features.d",
    }
    assert data["publishers"][0]["next_retry"] is None
    lines = output.publisher_table(data["publishers"], now=NOW).splitlines()
    assert lines[0].split() == ["PUBLISHER", "SINCE", "DETAIL", "STATE"]
    assert lines[1].split() == ["control-api", "5m", "ago", "ok"]
    assert lines[2].endswith("degraded (3 failed, retry in 8s): features.d is missing")
    assert "42s ago" in lines[2]
    assert "PUBLISHER" in output.status_table(data)


def test_status_renders_the_same_facts_in_every_format() -> None:
    data = output.status_dict(status())
    assert data["gpus"][0]["numa_node"] is None  # -1 on the wire means "no affinity"
    assert json.loads(output.render(data, "json", ""))["plugins"][0]["registered"] is True
    assert yaml.safe_load(output.render(data, "yaml", ""))["gpus"][0]["memory_mib"] == 15360
    table = output.status_table(data)
    assert "Unhealthy (critical XID 79)" in table
    assert "nvidia.com/gpu" in table and "yes" in table


@pytest.mark.parametrize(
    ("peer", "uid"),
    [
        ("unix-abstract:gpud-peer/0/123/9-1", 0),
        ("unix-abstract:gpud-peer/1000/5/9-2", 1000),
        ("unix:", None),
        ("unix-abstract:someone-else/0/1/2", None),
        ("unix-abstract:gpud-peer/x/1/2", None),
        ("ipv4:127.0.0.1:5000", None),
    ],
)
def test_peer_uid_only_trusts_the_gateways_addresses(peer: str, uid: int | None) -> None:
    assert peer_uid(peer) == uid


class _Echo(gpud_pb2_grpc.GpudServicer):
    async def GetStatus(self, request, context):
        return gpud_pb2.Status(version=context.peer())


async def _serve(gateway: Gateway) -> grpc.aio.Server:
    server = grpc.aio.server()
    gpud_pb2_grpc.add_GpudServicer_to_server(_Echo(), server)
    server.add_insecure_port(gateway.prepare())
    await server.start()
    await gateway.start()
    return server


def test_gateway_relays_and_reports_the_callers_uid(short_tmp: Path) -> None:
    async def scenario() -> None:
        gateway = Gateway(short_tmp / "run" / "gpud.sock", group="no-such-group-here")
        server = await _serve(gateway)
        try:
            mode = stat.S_IMODE(os.stat(gateway.public).st_mode)
            assert mode == 0o660
            assert stat.S_IMODE(os.stat(gateway.private_dir).st_mode) == 0o700
            async with grpc.aio.insecure_channel(f"unix:{gateway.public}") as ch:
                reply = await gpud_pb2_grpc.GpudStub(ch).GetStatus(gpud_pb2.GetStatusRequest())
            assert peer_uid(reply.version) == os.getuid()
            with pytest.raises(SocketInUse):
                Gateway(gateway.public, group="x").prepare()
        finally:
            await server.stop(None)
            await gateway.stop()
        assert not gateway.public.exists() and not gateway.private_dir.exists()

    asyncio.run(scenario())


def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    path = short_tmp / "gpud.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file remains, nobody listens: what a kill -9 leaves behind
    gateway = Gateway(path, group="x")
    gateway.prepare()
    assert not path.exists()
