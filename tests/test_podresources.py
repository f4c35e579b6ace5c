"""kubelet's PodResources API: the wire contract, the client over a real socket, users_of."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from gpud._proto.podresources.v1 import api_pb2, api_pb2_grpc
from gpud.k8s.podresources import (
    PodResourcesUnavailable,
    device_users,
    list_device_users,
    users_of,
)
from tests.support.podresources import FakePodResources, pod

GPU0 = "GPU-00000000-aaaa-4bbb-8ccc-000000000000"
GPU1 = "GPU-00000001-aaaa-4bbb-8ccc-000000000001"
MIG_A = "MIG-01010000-dddd-4eee-8fff-000000010100"
MIG_B = "MIG-01020000-dddd-4eee-8fff-000000010200"

PODS = [
    pod("ml", "train-0", main={"nvidia.com/gpu": [GPU0]}, sidecar={}),
    pod(
        "ml",
        "infer-1",
        server={"nvidia.com/mig-1g.5gb": [f"{MIG_A}::0", f"{MIG_A}::3"]},
        warmup={"nvidia.com/mig-1g.5gb": [f"{MIG_A}::1"], "example.com/nic": ["eth9"]},
    ),
    pod("dev", "notebook", lab={"nvidia.com/mig-1g.5gb": [f"{MIG_A}::2", MIG_B]}),
]

EXPECTED = {
    "eth9": ("ml/infer-1/warmup",),
    GPU0: ("ml/train-0/main",),
    f"{MIG_A}::0": ("ml/infer-1/server",),
    f"{MIG_A}::1": ("ml/infer-1/warmup",),
    f"{MIG_A}::2": ("dev/notebook/lab",),
    f"{MIG_A}::3": ("ml/infer-1/server",),
    MIG_B: ("dev/notebook/lab",),
}


def numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_wire_contract_field_numbers() -> None:
    """The numbers kubelet speaks (shared/reference/nvidia-anchors.md 4.5)."""
    assert api_pb2.DESCRIPTOR.package == "v1"
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert [m.full_name for m in service.methods] == [
        "v1.PodResourcesLister.List",
        "v1.PodResourcesLister.GetAllocatableResources",
        "v1.PodResourcesLister.Get",
    ]
    assert numbers(api_pb2.ListPodResourcesResponse) == {"pod_resources": 1}
    assert numbers(api_pb2.PodResources) == {
        "name": 1,
        "namespace": 2,
        "containers": 3,
        "cpu_ids": 4,
        "memory": 5,
    }
    assert numbers(api_pb2.ContainerResources) == {
        "name": 1,
        "devices": 2,
        "cpu_ids": 3,
        "memory": 4,
        "dynamic_resources": 5,
    }
    assert numbers(api_pb2.ContainerDevices) == {
        "resource_name": 1,
        "device_ids": 2,
        "topology": 3,
    }
    assert numbers(api_pb2.ContainerMemory) == {"memory_type": 1, "size": 2, "topology": 3}
    assert numbers(api_pb2.AllocatableResourcesResponse) == {
        "devices": 1,
        "cpu_ids": 2,
        "memory": 3,
    }
    assert numbers(api_pb2.TopologyInfo) == {"nodes": 1}
    assert numbers(api_pb2.NUMANode) == {"ID": 1}
    assert numbers(api_pb2.DynamicResource) == {
        "claim_name": 2,
        "claim_namespace": 3,
        "claim_resources": 4,
    }
    assert numbers(api_pb2.ClaimResource) == {
        "cdi_devices": 1,
        "driver_name": 2,
        "pool_name": 3,
        "device_name": 4,
        "share_id": 5,
    }
    assert numbers(api_pb2.CDIDevice) == {"name": 1}
    assert numbers(api_pb2.GetPodResourcesRequest) == {"pod_name": 1, "pod_namespace": 2}
    assert numbers(api_pb2.GetPodResourcesResponse) == {"pod_resources": 1}


def test_device_users_from_a_response() -> None:
    response = api_pb2.ListPodResourcesResponse(pod_resources=[p.message() for p in PODS])
    assert device_users(response) == EXPECTED
    assert device_users(api_pb2.ListPodResourcesResponse()) == {}


def test_one_device_in_two_containers_lists_both() -> None:
    shared = [
        pod("a", "p", c2={"nvidia.com/gpu": [GPU0]}, c1={"nvidia.com/gpu": [GPU0]}),
        pod("a", "p2", c={"nvidia.com/gpu": [GPU0]}),
    ]
    response = api_pb2.ListPodResourcesResponse(pod_resources=[p.message() for p in shared])
    assert device_users(response) == {GPU0: ("a/p/c1", "a/p/c2", "a/p2/c")}


def test_list_over_a_real_socket(short_tmp: Path) -> None:
    sock = short_tmp / "pod-resources" / "kubelet.sock"
    with FakePodResources(sock, PODS) as fake:
        assert asyncio.run(list_device_users(sock, timeout=5)) == EXPECTED
        fake.pods = []
        assert asyncio.run(list_device_users(sock, timeout=5)) == {}
        assert fake.calls == ["List", "List"]


def test_missing_socket_is_unavailable(short_tmp: Path) -> None:
    sock = short_tmp / "pod-resources" / "kubelet.sock"
    with pytest.raises(PodResourcesUnavailable) as err:
        asyncio.run(list_device_users(sock, timeout=1))
    assert str(err.value).startswith(f"kubelet's PodResources socket {sock} does not exist")


def test_stale_socket_is_unavailable(short_tmp: Path) -> None:
    import socket as socketlib

    sock = short_tmp / "kubelet.sock"
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(sock))
    s.close()  # the file stays, nobody listens: a kubelet that died
    started = time.monotonic()
    with pytest.raises(PodResourcesUnavailable) as err:
        asyncio.run(list_device_users(sock, timeout=5))
    assert "did not answer List: UNAVAILABLE" in str(err.value)
    assert time.monotonic() - started < 5


def test_kubelet_errors_and_timeouts_are_unavailable(short_tmp: Path) -> None:
    sock = short_tmp / "kubelet.sock"
    with FakePodResources(sock, PODS) as fake:
        fake.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(PodResourcesUnavailable, match="RESOURCE_EXHAUSTED: fake kubelet"):
            asyncio.run(list_device_users(sock, timeout=5))
        fake.fail_with = None
        fake.delay = 1.0
        with pytest.raises(PodResourcesUnavailable, match="DEADLINE_EXCEEDED"):
            asyncio.run(list_device_users(sock, timeout=0.2))


def test_large_lists_fit(short_tmp: Path) -> None:
    """A busy node's List exceeds gRPC's 4 MiB default; kubelet's own client allows 16 MiB."""
    sock = short_tmp / "kubelet.sock"
    many = [
        pod("ns", f"pod-{i:05d}", c={"nvidia.com/gpu": [f"{GPU0}::{i}-{'x' * 200}"]})
        for i in range(25000)
    ]
    with FakePodResources(sock, many):
        got = asyncio.run(list_device_users(sock, timeout=30))
    assert len(got) == 25000


def test_fake_serves_get_and_allocatable(short_tmp: Path) -> None:
    sock = short_tmp / "kubelet.sock"
    with (
        FakePodResources(sock, PODS, {"nvidia.com/gpu": [GPU0, GPU1]}) as fake,
        grpc.insecure_channel(f"unix:{sock}") as channel,
    ):
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        got = stub.Get(api_pb2.GetPodResourcesRequest(pod_name="notebook", pod_namespace="dev"))
        assert got.pod_resources.containers[0].devices[0].device_ids == [f"{MIG_A}::2", MIG_B]
        with pytest.raises(grpc.RpcError) as err:
            stub.Get(api_pb2.GetPodResourcesRequest(pod_name="gone", pod_namespace="dev"))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        alloc = stub.GetAllocatableResources(api_pb2.AllocatableResourcesRequest())
        assert list(alloc.devices[0].device_ids) == [GPU0, GPU1]
        assert fake.calls == ["Get", "Get", "GetAllocatableResources"]


# ---- users_of -------------------------------------------------------------------------------


def test_users_of_folds_replicas_onto_their_uuid() -> None:
    assert users_of(EXPECTED, [MIG_A, MIG_B, GPU0, GPU1]) == {
        MIG_A: ("dev/notebook/lab", "ml/infer-1/server", "ml/infer-1/warmup"),
        MIG_B: ("dev/notebook/lab",),
        GPU0: ("ml/train-0/main",),
    }


def test_users_of_unused_devices_is_empty() -> None:
    assert users_of(EXPECTED, [GPU1]) == {}
    assert users_of({}, [GPU0]) == {}
    assert users_of(EXPECTED, []) == {}


def test_users_of_does_not_match_prefixes() -> None:
    # A GPU UUID is never a prefix match for a MIG UUID or another GPU's replica.
    users = {f"{GPU0}0::1": ("x/y/z",), f"{MIG_A}::0": ("a/b/c",)}
    assert users_of(users, [GPU0]) == {}
    assert users_of(users, [MIG_A]) == {MIG_A: ("a/b/c",)}
