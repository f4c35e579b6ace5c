"""Who holds which device, from kubelet's PodResources API (v1 ``List``).

gpud asks before it destroys MIG instances or otherwise takes a device away: a device kubelet has
assigned to a running container must not vanish under it. The answer is keyed by device ID as
kubelet knows it (a GPU UUID, a MIG UUID or a replica ``<uuid>::<n>``); :func:`users_of` folds
replicas back onto the UUID they share, which is the unit MIG reconfiguration works on.

Only device-plugin devices are read. Devices handed out through Dynamic Resource Allocation are
not gpud's, and pod-level CPU and memory are irrelevant here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from gpud._proto.podresources.v1 import api_pb2, api_pb2_grpc

# Replica IDs are "<uuid>::<n>", as gpud (gpud.resources.allocate) and NVIDIA's plugin make them.
REPLICA_SEPARATOR = "::"

# kubelet's own client allows 16 MiB responses; a busy node's List can exceed gRPC's 4 MiB default.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_DIAL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),
]


class PodResourcesUnavailable(Exception):
    """kubelet's PodResources API could not be asked: the socket is absent, refuses, errs or does
    not answer in time.

    The caller decides what that means (refuse to reconfigure where kubelet is installed, proceed
    on a node without it), so this is one exception type with a message an operator can act on.
    """


def user_name(pod: api_pb2.PodResources, container: api_pb2.ContainerResources) -> str:
    return f"{pod.namespace}/{pod.name}/{container.name}"


def device_users(response: api_pb2.ListPodResourcesResponse) -> dict[str, tuple[str, ...]]:
    """Each device ID to the sorted, distinct "namespace/pod/container" strings holding it."""
    users: dict[str, set[str]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            who = user_name(pod, container)
            for devices in container.devices:
                for device_id in devices.device_ids:
                    users.setdefault(device_id, set()).add(who)
    return {device_id: tuple(sorted(names)) for device_id, names in sorted(users.items())}


async def list_device_users(socket: Path, timeout: float) -> dict[str, tuple[str, ...]]:
    """Ask kubelet at ``socket`` which containers hold which devices (see :func:`device_users`).

    Raises PodResourcesUnavailable when the socket does not exist, or when kubelet does not
    answer within ``timeout`` seconds or answers with an error.
    """
    return device_users(await list_pod_resources(socket, timeout))


async def list_pod_resources(socket: Path, timeout: float) -> api_pb2.ListPodResourcesResponse:
    """kubelet's whole ``List`` answer, over a channel of its own; raises
    PodResourcesUnavailable as :func:`list_device_users` does."""
    client = PodResourcesClient(socket)
    try:
        return await client.list(timeout)
    finally:
        await client.close()


class PodResourcesClient:
    """A channel to kubelet's PodResources kept between calls, for a caller that asks on every
    Prometheus scrape: dialing the socket anew costs several times the ``List`` itself.

    gRPC reconnects a kept channel when kubelet restarts; a channel whose call failed is dropped
    all the same, so the next call dials afresh instead of waiting out gRPC's reconnect backoff.
    """

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._channel: grpc.aio.Channel | None = None

    async def list(self, timeout: float) -> api_pb2.ListPodResourcesResponse:
        if not self.socket.exists():
            await self.close()
            raise PodResourcesUnavailable(
                f"kubelet's PodResources socket {self.socket} does not exist: kubelet is not "
                "running on this node, or its root directory is elsewhere "
                "(set paths.podResourcesSocket)"
            )
        try:
            return await self._list(timeout)
        except grpc.aio.AioRpcError as exc:
            await self.close()
            raise PodResourcesUnavailable(
                f"kubelet's PodResources API at {self.socket} did not answer List: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc

    async def _list(self, timeout: float) -> api_pb2.ListPodResourcesResponse:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self.socket}", options=_DIAL_OPTIONS)
        stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        return await stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


def base_uuid(device_id: str) -> str:
    """``<uuid>`` for a replica ID ``<uuid>::<n>``; any other ID unchanged."""
    return device_id.split(REPLICA_SEPARATOR, 1)[0]


def users_of(
    device_users: Mapping[str, Iterable[str]], uuids: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """For each of ``uuids`` (GPU or MIG UUIDs) that is in use, who uses it.

    A replica ``<uuid>::<n>`` counts as a use of ``<uuid>``. UUIDs nobody uses are left out, so
    an empty result means "safe to take away". Users are sorted and distinct.
    """
    wanted = dict.fromkeys(uuids)
    found: dict[str, set[str]] = {}
    for device_id, names in device_users.items():
        uuid = base_uuid(device_id)
        if uuid in wanted:
            found.setdefault(uuid, set()).update(names)
    return {uuid: tuple(sorted(found[uuid])) for uuid in wanted if found.get(uuid)}
