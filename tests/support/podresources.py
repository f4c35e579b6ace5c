"""A fake of kubelet's PodResources service (v1), served over a real unix socket.

``List`` answers with the pods the test configured, ``Get`` finds one of them by namespace and
name (NOT_FOUND otherwise, like kubelet), and ``GetAllocatableResources`` answers with the
configured allocatable devices. A test can make every call fail with a status code or answer late,
to exercise the client's error handling. Synchronous (a thread-pool gRPC server), so tests need no
event loop to drive it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from gpud._proto.podresources.v1 import api_pb2, api_pb2_grpc

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class FakeContainer:
    name: str
    # resource name -> device IDs kubelet assigned to the container.
    devices: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FakePod:
    namespace: str
    name: str
    containers: Sequence[FakeContainer] = ()

    def message(self) -> api_pb2.PodResources:
        return api_pb2.PodResources(
            name=self.name,
            namespace=self.namespace,
            containers=[
                api_pb2.ContainerResources(
                    name=c.name,
                    devices=[
                        api_pb2.ContainerDevices(resource_name=resource, device_ids=list(ids))
                        for resource, ids in c.devices.items()
                    ],
                    cpu_ids=[0, 1],
                )
                for c in self.containers
            ],
        )


def pod(namespace: str, name: str, **containers: Mapping[str, Sequence[str]]) -> FakePod:
    """``pod("ml", "train-0", main={"nvidia.com/gpu": [uuid]})``."""
    return FakePod(namespace, name, tuple(FakeContainer(n, d) for n, d in containers.items()))


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, fake: FakePodResources) -> None:
        self._fake = fake

    def List(self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext):
        self._fake._enter("List", context)
        return api_pb2.ListPodResourcesResponse(
            pod_resources=[p.message() for p in self._fake.pods]
        )

    def GetAllocatableResources(
        self, request: api_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ):
        self._fake._enter("GetAllocatableResources", context)
        return api_pb2.AllocatableResourcesResponse(
            devices=[
                api_pb2.ContainerDevices(resource_name=resource, device_ids=list(ids))
                for resource, ids in self._fake.allocatable.items()
            ]
        )

    def Get(self, request: api_pb2.GetPodResourcesRequest, context: grpc.ServicerContext):
        self._fake._enter("Get", context)
        for p in self._fake.pods:
            if (p.namespace, p.name) == (request.pod_namespace, request.pod_name):
                return api_pb2.GetPodResourcesResponse(pod_resources=p.message())
        context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
        )


class FakePodResources:
    """kubelet's ``pod-resources/kubelet.sock``. Set ``pods`` (and ``allocatable``) at any time.

    ``fail_with`` makes every call abort with that status; ``delay`` makes every call sleep that
    many seconds first. ``calls`` records the method names served, in order.
    """

    def __init__(
        self,
        socket_path: Path,
        pods: Sequence[FakePod] = (),
        allocatable: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if len(os.fsencode(str(socket_path))) > _MAX_SOCKET_PATH:
            raise ValueError(f"unix socket path {socket_path} is too long; use short_tmp")
        self.socket_path = Path(socket_path)
        self.pods: list[FakePod] = list(pods)
        self.allocatable: dict[str, Sequence[str]] = dict(allocatable or {})
        self.fail_with: grpc.StatusCode | None = None
        self.delay = 0.0
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(method)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            context.abort(self.fail_with, f"fake kubelet fails {method}")

    def start(self) -> FakePodResources:
        if self._server is not None:
            raise RuntimeError("FakePodResources already started")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-podres"))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving; gRPC removes the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait()

    def __enter__(self) -> FakePodResources:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
