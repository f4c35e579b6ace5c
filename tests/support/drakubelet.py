"""kubelet's DRA side for tests: its plugin watcher, registration and DRA client over real gRPC.

What kubelet does (shared/reference/dra.md §1.3, §2.3), no more: it watches ``plugins_registry``
with inotify (and walks it once at start, taking every socket there as new), calls ``GetInfo`` on
a new socket with kubelet's 1 s timeout, accepts only type ``DRAPlugin`` and the first of the
plugin's versions it knows, dials the endpoint and answers ``NotifyRegistrationStatus``. A
removed socket deregisters the driver. Prepare and Unprepare go to the driver's endpoint with
claims named by namespace, name and UID and kubelet's 45 s timeout; ``watch_health`` opens the
v1alpha1 health stream. ``restart`` forgets everything, as a kubelet restart does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from asyncinotify import Inotify, Mask

from gpud._proto.dra.v1 import api_pb2 as v1
from gpud._proto.dra.v1 import api_pb2_grpc as v1_grpc
from gpud._proto.dra.v1beta1 import api_pb2 as v1beta1
from gpud._proto.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from gpud._proto.drahealth.v1alpha1 import api_pb2 as health
from gpud._proto.drahealth.v1alpha1 import api_pb2_grpc as health_grpc
from gpud._proto.pluginregistration.v1 import api_pb2 as reg
from gpud._proto.pluginregistration.v1 import api_pb2_grpc as reg_grpc

KNOWN = {"v1.DRAPlugin": "v1", "v1beta1.DRAPlugin": "v1beta1"}
PREPARE_TIMEOUT_S = 45.0
GET_INFO_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class DraRegistration:
    socket: str
    driver: str
    endpoint: str
    versions: tuple[str, ...]
    chosen: str
    at: float


@dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    uid: str


class FakeDraKubelet:
    def __init__(self, root: Path, supported: tuple[str, ...] = tuple(KNOWN)) -> None:
        self.root = root
        self.registry = root / "plugins_registry"
        self.supported = supported
        self._lock = threading.Lock()
        self._registrations: list[DraRegistration] = []
        self._drivers: dict[str, DraRegistration] = {}
        self.rejections: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: concurrent.futures.Future[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeDraKubelet:
        self.registry.mkdir(parents=True, exist_ok=True)
        (self.root / "plugins").mkdir(parents=True, exist_ok=True)
        loop = self._loop = asyncio.new_event_loop()
        armed = threading.Event()
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._watch(armed), loop)
        if not armed.wait(10):
            raise AssertionError("the DRA kubelet's watch was not armed")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        assert self._task is not None and self._thread is not None
        self._task.cancel()  # thread-safe: cancels the watch in its loop
        concurrent.futures.wait([self._task], timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        with self._lock:
            self._drivers.clear()

    def restart(self) -> None:
        """A kubelet restart: no memory of plugins; the registry is walked again."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeDraKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what a test reads -----------------------------------------------------------------
    def registrations(self) -> list[DraRegistration]:
        with self._lock:
            return list(self._registrations)

    def registered(self, driver: str) -> DraRegistration | None:
        with self._lock:
            return self._drivers.get(driver)

    def wait_registered(
        self, driver: str, count: int = 1, timeout: float = 20.0
    ) -> DraRegistration:
        def enough() -> bool:
            mine = [r for r in self.registrations() if r.driver == driver]
            return len(mine) >= count and self.registered(driver) is not None

        wait_for(enough, timeout, lambda: f"{driver} registered {count}x: {self.registrations()}")
        found = self.registered(driver)
        assert found is not None
        return found

    def wait_deregistered(self, driver: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self.registered(driver) is None, timeout, lambda: f"{driver} gone")

    # --- kubelet's calls -------------------------------------------------------------------
    def prepare(self, driver: str, *claims: Claim, version: str = "v1") -> dict[str, Any]:
        """NodePrepareResources; {uid: {"devices": [...], "error": str}}."""
        api, stub = self._stub(driver, version)
        request = api.NodePrepareResourcesRequest(
            claims=[api.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
        )
        reply = stub.NodePrepareResources(request, timeout=PREPARE_TIMEOUT_S)
        self._check_uids(claims, reply.claims)
        return {
            uid: {
                "error": r.error,
                "devices": [
                    {
                        "requestNames": list(d.request_names),
                        "pool": d.pool_name,
                        "device": d.device_name,
                        "cdiDeviceIDs": list(d.cdi_device_ids),
                    }
                    for d in r.devices
                ],
            }
            for uid, r in reply.claims.items()
        }

    def unprepare(self, driver: str, *claims: Claim, version: str = "v1") -> dict[str, str]:
        api, stub = self._stub(driver, version)
        request = api.NodeUnprepareResourcesRequest(
            claims=[api.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]
        )
        reply = stub.NodeUnprepareResources(request, timeout=PREPARE_TIMEOUT_S)
        self._check_uids(claims, reply.claims)
        return {uid: r.error for uid, r in reply.claims.items()}

    def watch_health(self, driver: str) -> Iterator[dict[str, tuple[int, str]]]:
        """The v1alpha1 health stream as kubelet opens it: each message as
        {device name: (health, message)}, the pool checked to be one per message."""
        found = self.registered(driver)
        if found is None or "v1alpha1.DRAResourceHealth" not in found.versions:
            raise AssertionError(f"{driver} does not advertise the health service: {found}")
        channel = grpc.insecure_channel(f"unix:{found.endpoint}")
        stream = health_grpc.DRAResourceHealthStub(channel).NodeWatchResources(
            health.NodeWatchResourcesRequest()
        )
        try:
            for message in stream:
                yield {d.device.device_name: (d.health, d.message) for d in message.devices}
        finally:
            stream.cancel()
            channel.close()

    @staticmethod
    def _check_uids(claims: tuple[Claim, ...], answered: Any) -> None:
        # kubelet fails a call whose map lacks a claim or names one it did not ask about.
        assert sorted(answered) == sorted(c.uid for c in claims), (list(answered), claims)

    def _stub(self, driver: str, version: str) -> tuple[Any, Any]:
        found = self.registered(driver)
        if found is None:
            raise AssertionError(f"DRA driver {driver} is not registered")
        channel = grpc.insecure_channel(f"unix:{found.endpoint}")
        if version == "v1":
            return v1, v1_grpc.DRAPluginStub(channel)
        return v1beta1, v1beta1_grpc.DRAPluginStub(channel)

    # --- the plugin watcher ----------------------------------------------------------------
    async def _watch(self, armed: threading.Event) -> None:
        with Inotify() as inotify:
            inotify.add_watch(self.registry, Mask.CREATE | Mask.DELETE | Mask.MOVED_TO)
            armed.set()
            for path in sorted(self.registry.iterdir()):
                await self._found(path)
            async for event in inotify:
                if event.name is None:
                    continue
                path = self.registry / str(event.name)
                if event.mask & Mask.DELETE:
                    self._gone(path)
                else:
                    await self._found(path)

    async def _found(self, path: Path) -> None:
        if path.name.startswith(".") or not path.is_socket():
            return
        await asyncio.to_thread(self._register, path)

    def _gone(self, path: Path) -> None:
        with self._lock:
            for driver, r in list(self._drivers.items()):
                if r.socket == str(path):
                    del self._drivers[driver]

    def _register(self, path: Path) -> None:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = reg_grpc.RegistrationStub(channel)
            try:
                info = stub.GetInfo(
                    reg.InfoRequest(), timeout=GET_INFO_TIMEOUT_S, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                self.rejections.append(f"{path}: GetInfo failed: {exc.code().name}")
                return
            error = self._validate(info)
            if not error:
                with grpc.insecure_channel(f"unix:{info.endpoint}") as dra:
                    try:
                        grpc.channel_ready_future(dra).result(timeout=10)
                    except grpc.FutureTimeoutError:
                        error = f"cannot dial {info.endpoint}"
            stub.NotifyRegistrationStatus(
                reg.RegistrationStatus(plugin_registered=not error, error=error), timeout=5
            )
        if error:
            self.rejections.append(error)
            return
        chosen = next(v for v in info.supported_versions if v in self.supported)
        found = DraRegistration(
            str(path), info.name, info.endpoint, tuple(info.supported_versions), chosen, time.time()
        )
        with self._lock:
            self._registrations.append(found)
            self._drivers[info.name] = found

    def _validate(self, info: reg.PluginInfo) -> str:
        if info.type != "DRAPlugin":
            return f"plugin type {info.type!r} is not DRAPlugin"
        if not any(v in self.supported for v in info.supported_versions):
            return (
                f"none of services supported by the plugin {list(info.supported_versions)} "
                f"are supported by the kubelet {list(self.supported)}"
            )
        if not Path(info.endpoint).is_absolute():
            return f"endpoint {info.endpoint!r} is not an absolute path"
        return ""


def wait_for(check: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what()}")
        time.sleep(0.02)
