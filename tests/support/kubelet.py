"""A fake of kubelet's device manager, speaking real gRPC over real unix sockets.

gpud's device plugins are only correct if they survive kubelet's actual behaviour, so this fake
reproduces the parts gpud depends on (shared/reference/nvidia-anchors.md, section 4.4):

* ``Register`` validates the version and the resource name, then *synchronously* dials the
  plugin's socket and calls ``GetDevicePluginOptions`` before answering. A plugin that registers
  before it serves therefore gets an error, exactly as with the real kubelet.
* After a successful registration a ListAndWatch stream runs in a background thread; every
  message replaces the device list of that resource.
* When the stream ends, every device of the resource counts as unhealthy (allocatable 0) until
  the plugin sends a new list.
* A kubelet (re)start deletes every unix socket in the plugin directory (but keeps directories
  and regular files such as ``kubelet_internal_checkpoint``), which is the signal plugins watch
  for to re-register, and forgets all device lists.

Everything is synchronous (a thread-pool gRPC server plus one thread per stream) so tests and
benchmarks can call it without an event loop. Waiting is done on one ``threading.Condition``
that every state change notifies, so waits wake up as soon as the condition holds instead of
sleep-polling, which matters for latency benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import grpc

from gpud._proto.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT_FILE = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

# k8s.io/apimachinery validation: qualified-name part and DNS-1123 subdomain.
_QUALIFIED_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


@dataclass(frozen=True)
class Registration:
    """One successful ``Register`` call, as kubelet stored it.

    ``at`` is ``time.monotonic()`` when the request arrived, so a benchmark can measure
    "kubelet restarted -> plugin re-registered" without the dial time of the fake skewing it.
    ``options`` is what ``GetDevicePluginOptions`` returned (what kubelet acts on);
    ``requested_options`` is what the plugin put in the RegisterRequest, kept so tests can check
    the two agree.
    """

    at: float
    version: str
    endpoint: str
    resource: str
    options: api_pb2.DevicePluginOptions
    requested_options: api_pb2.DevicePluginOptions | None = None


@dataclass(frozen=True)
class Rejection:
    """A ``Register`` call that kubelet answered with an error, kept for diagnostics."""

    at: float
    version: str
    endpoint: str
    resource: str
    error: str


@dataclass(frozen=True)
class SeenDevice:
    """One device as the last ListAndWatch message described it."""

    id: str
    health: str
    numa_nodes: tuple[int, ...]


@dataclass(eq=False)
class _Client:
    """kubelet's connection to one registered plugin endpoint."""

    resource: str
    endpoint: str
    channel: grpc.Channel
    stub: api_pb2_grpc.DevicePluginStub
    options: api_pb2.DevicePluginOptions
    thread: threading.Thread | None = None
    error: str = ""


@dataclass
class _ResourceState:
    client: _Client | None = None
    devices: dict[str, SeenDevice] = field(default_factory=dict)
    updates: int = 0
    # True from the end of a stream until the next ListAndWatch message: kubelet has moved every
    # device to its unhealthy set, so allocatable is 0 whatever the last list said.
    disconnected: bool = False


class _RegistrationServicer(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet, epoch: int) -> None:
        self._kubelet = kubelet
        self._epoch = epoch

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext):
        return self._kubelet._register(request, context, self._epoch)


def invalid_resource_name(name: str) -> bool:
    """Mirror of ``!v1helper.IsExtendedResourceName``: what kubelet refuses to register.

    Extended resources are domain-prefixed, outside ``kubernetes.io/``, and must still be a
    valid qualified name once kubelet prefixes ``requests.`` for quota.
    """
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return True
    parts = f"requests.{name}".split("/")
    if len(parts) != 2:
        return True
    prefix, part = parts
    if not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
        return True
    return len(part) > 63 or not _QUALIFIED_NAME_PART.match(part)


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > _MAX_SOCKET_PATH:
        raise ValueError(
            f"unix socket path {path} is longer than {_MAX_SOCKET_PATH} bytes; "
            "use a short directory (the short_tmp fixture)"
        )


class FakeKubelet:
    """kubelet's device manager, as far as gpud can observe it. See the module docstring.

    ``dial_timeout`` is kubelet's 10 s blocking dial in ``Register``; tests that provoke a dial
    failure lower it so they do not spend 10 s. ``on_update`` is called (outside the lock, from
    the stream thread) with ``(resource, time.monotonic())`` for every ListAndWatch message.
    """

    def __init__(
        self,
        plugin_dir: Path,
        *,
        dial_timeout: float = 10.0,
        rpc_timeout: float = 10.0,
        workers: int = 8,
    ) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.socket_path = self.plugin_dir / KUBELET_SOCKET
        _check_socket_path(self.socket_path)
        self.dial_timeout = dial_timeout
        self.rpc_timeout = rpc_timeout
        self.on_update: Callable[[str, float], None] | None = None
        self._workers = workers
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Bumped on every start/stop so a Register that was in flight across a stop cannot
        # install a client into a kubelet that no longer exists.
        self._epoch = 0
        self._registrations: list[Registration] = []
        self._rejections: list[Rejection] = []
        self._resources: dict[str, _ResourceState] = {}

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start serving ``kubelet.sock``, as kubelet's device manager does on start.

        Like kubelet, this creates the directory (0750) and first deletes every socket in it:
        on a real node plugin sockets never survive a kubelet start, and gpud must cope.
        Device lists of already known resources are reset to empty (kubelet restores only
        empty device sets from its checkpoint) until their plugins register again.
        """
        with self._cond:
            if self._server is not None:
                raise RuntimeError("FakeKubelet already started")
            self.plugin_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            self.cleanup_plugin_dir()
            for state in self._resources.values():
                state.client = None
                state.devices = {}
                state.disconnected = False
            self._epoch += 1
            executor = ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="fake-kubelet"
            )
            server = grpc.server(executor)
            api_pb2_grpc.add_RegistrationServicer_to_server(
                _RegistrationServicer(self, self._epoch), server
            )
            server.add_insecure_port(f"unix:{self.socket_path}")
            server.start()
            self._server, self._executor = server, executor
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop serving, close every plugin connection and remove ``kubelet.sock``.

        Closing the connections is what a dying kubelet does to its ListAndWatch streams;
        plugins see their streams cancelled.
        """
        with self._cond:
            server, executor = self._server, self._executor
            if server is None:
                return
            self._server = self._executor = None
            self._epoch += 1
            clients = [s.client for s in self._resources.values() if s.client is not None]
            for state in self._resources.values():
                state.client = None
                state.disconnected = True
            self._cond.notify_all()
        server.stop(grace=None).wait()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._close_clients(clients)
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path.is_socket():
                self.socket_path.unlink()

    def restart(self) -> None:
        """Simulate a kubelet restart: stop, delete all sockets in the directory, serve again."""
        self.stop()
        self.start()

    def cleanup_plugin_dir(self) -> list[Path]:
        """Delete every unix socket in the plugin directory, as kubelet's
        ``CleanupPluginDirectory``: directories and non-socket files (the checkpoint) stay.
        Returns what was removed."""
        removed: list[Path] = []
        try:
            names = sorted(os.listdir(self.plugin_dir))
        except FileNotFoundError:
            return removed
        for name in names:
            path = self.plugin_dir / name
            if name == CHECKPOINT_FILE:
                continue
            try:
                st = os.stat(path)  # follows symlinks, as Go's os.Stat
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or not stat.S_ISSOCK(st.st_mode):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed

    @property
    def running(self) -> bool:
        with self._cond:
            return self._server is not None

    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------------- observations

    @property
    def registrations(self) -> list[Registration]:
        """Successful registrations, oldest first, across restarts."""
        with self._cond:
            return list(self._registrations)

    @property
    def rejections(self) -> list[Rejection]:
        """Register calls answered with an error, oldest first."""
        with self._cond:
            return list(self._rejections)

    def devices(self, resource: str) -> dict[str, SeenDevice]:
        """The device list of the latest ListAndWatch message (empty after a kubelet start).

        This is what the plugin last said, not kubelet's health view: after a stream end the
        devices keep their reported health here and only ``allocatable`` drops to 0, so a
        benchmark waiting for "Unhealthy" is not fooled by a disconnect.
        """
        with self._cond:
            state = self._resources.get(resource)
            return dict(state.devices) if state else {}

    def updates(self, resource: str) -> int:
        """Number of ListAndWatch messages received for ``resource`` (all streams, cumulative)."""
        with self._cond:
            state = self._resources.get(resource)
            return state.updates if state else 0

    def connected(self, resource: str) -> bool:
        """Whether a ListAndWatch stream for ``resource`` is currently open."""
        with self._cond:
            state = self._resources.get(resource)
            return bool(state and state.client is not None and not state.disconnected)

    def capacity(self, resource: str) -> int:
        """Node capacity as kubelet computes it: healthy + unhealthy devices."""
        with self._cond:
            state = self._resources.get(resource)
            return len(state.devices) if state else 0

    def allocatable(self, resource: str) -> int:
        """Healthy devices; 0 once the stream ended, until the plugin sends a new list."""
        with self._cond:
            state = self._resources.get(resource)
            if state is None or state.disconnected:
                return 0
            return sum(1 for d in state.devices.values() if d.health == HEALTHY)

    # -------------------------------------------------------------------------------- waits

    def wait_until(
        self, condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Block until ``condition()`` holds; it is evaluated under the lock after every state
        change, so it may call the observation methods of this object."""
        with self._cond:
            if not self._cond.wait_for(condition, timeout=timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; {self._seen()}"
                )

    def wait_registered(self, resource: str, count: int = 1, timeout: float = 10.0) -> Registration:
        """Block until ``resource`` has at least ``count`` successful registrations (counted
        across restarts); return the latest one."""

        def mine() -> list[Registration]:
            return [r for r in self._registrations if r.resource == resource]

        with self._cond:
            if not self._cond.wait_for(lambda: len(mine()) >= count, timeout=timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {count} registration(s) of "
                    f"{resource!r}; {self._seen()}"
                )
            return mine()[-1]

    def wait_devices(
        self,
        resource: str,
        predicate: Callable[[dict[str, SeenDevice]], bool],
        timeout: float = 10.0,
    ) -> dict[str, SeenDevice]:
        """Block until ``predicate(devices(resource))`` holds; return that device list."""
        seen: dict[str, SeenDevice] = {}

        def check() -> bool:
            nonlocal seen
            state = self._resources.get(resource)
            seen = dict(state.devices) if state else {}
            return predicate(seen)

        with self._cond:
            if not self._cond.wait_for(check, timeout=timeout):
                state = self._resources.get(resource)
                raise AssertionError(
                    f"timed out after {timeout}s waiting for devices of {resource!r}; last list "
                    f"({state.updates if state else 0} updates, "
                    f"disconnected={state.disconnected if state else None}): "
                    f"{sorted(seen.values(), key=lambda d: d.id)}"
                )
            return seen

    def wait_updates(
        self, resource: str, count: int, timeout: float = 10.0
    ) -> dict[str, SeenDevice]:
        """Block until at least ``count`` ListAndWatch messages arrived for ``resource``."""
        self.wait_until(
            lambda: self.updates(resource) >= count, timeout, f"{count} updates of {resource!r}"
        )
        return self.devices(resource)

    def wait_disconnected(self, resource: str, timeout: float = 10.0) -> None:
        """Block until the ListAndWatch stream of ``resource`` has ended."""

        def ended() -> bool:
            state = self._resources.get(resource)
            return bool(state and state.disconnected)

        self.wait_until(ended, timeout, f"the stream of {resource!r} to end")

    def _seen(self) -> str:
        regs = [(r.resource, r.endpoint, r.version) for r in self._registrations]
        rejs = [(r.resource, r.endpoint, r.error) for r in self._rejections]
        res = {
            name: {
                "devices": len(s.devices),
                "updates": s.updates,
                "connected": s.client is not None,
                "disconnected": s.disconnected,
            }
            for name, s in self._resources.items()
        }
        return f"registrations={regs} rejections={rejs} resources={res}"

    # ----------------------------------------------------------------------- kubelet -> plugin

    def stub(self, resource: str) -> api_pb2_grpc.DevicePluginStub:
        """Stub on kubelet's own channel to the endpoint registered for ``resource``."""
        with self._cond:
            state = self._resources.get(resource)
            if state is None or state.client is None:
                raise AssertionError(f"no live endpoint for {resource!r}; {self._seen()}")
            return state.client.stub

    def options(self, resource: str) -> api_pb2.DevicePluginOptions:
        """The options stored at registration (from ``GetDevicePluginOptions``)."""
        with self._cond:
            state = self._resources.get(resource)
            if state is None or state.client is None:
                raise AssertionError(f"no live endpoint for {resource!r}; {self._seen()}")
            return state.client.options

    def allocate(
        self, resource: str, ids: Sequence[str], *, validate: bool = True
    ) -> api_pb2.ContainerAllocateResponse:
        """Allocate ``ids`` for one container, as kubelet does at admission.

        With ``validate`` the fake first applies kubelet's own admission checks (known, healthy
        devices), so a test notices when gpud advertises something kubelet would never hand
        out; turn it off to send arbitrary IDs to the plugin. Exactly one container response is
        required: kubelet stores ``container_responses[0]``, so anything else is a plugin bug.
        """
        if validate:
            with self._cond:
                state = self._resources.get(resource)
                if state is None or not state.devices:
                    raise AssertionError(f"cannot allocate unregistered device of {resource!r}")
                unknown = [i for i in ids if i not in state.devices]
                if unknown:
                    raise AssertionError(f"cannot allocate unregistered device(s) {unknown}")
                unhealthy = [
                    i for i in ids if state.disconnected or state.devices[i].health != HEALTHY
                ]
                if unhealthy:
                    raise AssertionError(f"cannot allocate unhealthy device(s) {unhealthy}")
        request = api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
        )
        response = self.stub(resource).Allocate(request, timeout=self.rpc_timeout)
        if len(response.container_responses) != 1:
            raise AssertionError(
                f"Allocate for one container returned {len(response.container_responses)} "
                "container responses"
            )
        return response.container_responses[0]

    def preferred(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str] = (),
        size: int = 1,
    ) -> list[str]:
        """Call ``GetPreferredAllocation`` for one container; kubelet only does so when the
        plugin advertised it, so calling it otherwise is an error of the test."""
        if not self.options(resource).get_preferred_allocation_available:
            raise AssertionError(f"{resource!r} did not advertise GetPreferredAllocation")
        request = api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must_include),
                    allocation_size=size,
                )
            ]
        )
        response = self.stub(resource).GetPreferredAllocation(request, timeout=self.rpc_timeout)
        if not response.container_responses:
            raise AssertionError("GetPreferredAllocation returned no container response")
        return list(response.container_responses[0].deviceIDs)

    # --------------------------------------------------------------------------- internals

    def _reject(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext, at: float, msg: str
    ) -> NoReturn:
        with self._cond:
            self._rejections.append(
                Rejection(at, request.version, request.endpoint, request.resource_name, msg)
            )
            self._cond.notify_all()
        # A Go handler returning a plain error reaches the client as codes.Unknown.
        context.abort(grpc.StatusCode.UNKNOWN, msg)
        raise AssertionError("unreachable: context.abort raises")

    def _register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext, epoch: int
    ) -> api_pb2.Empty:
        at = time.monotonic()
        if request.version not in SUPPORTED_VERSIONS:
            self._reject(
                request,
                context,
                at,
                f"requested API version {request.version!r} is not supported by kubelet. "
                f"Supported versions are {list(SUPPORTED_VERSIONS)!r}",
            )
        if invalid_resource_name(request.resource_name):
            self._reject(
                request, context, at, f"the ResourceName {request.resource_name!r} is invalid"
            )

        # connectClient: blocking dial with a deadline, then GetDevicePluginOptions, all before
        # Register answers. The plugin must already be serving.
        path = self.plugin_dir / request.endpoint
        # kubelet (Go) opens a fresh connection per dial. Python's gRPC would otherwise share
        # one from a global pool with an earlier channel to the same path, which may be the
        # dying connection to a plugin process that has just exited.
        channel = grpc.insecure_channel(
            f"unix:{path}",
            options=[
                ("grpc.default_authority", "localhost"),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=self.dial_timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            self._reject(
                request,
                context,
                at,
                f"failed to dial device plugin {path}: context deadline exceeded",
            )
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=self.rpc_timeout)
        except grpc.RpcError as err:
            channel.close()
            self._reject(
                request, context, at, f"failed to get device plugin options: {_describe(err)}"
            )

        client = _Client(request.resource_name, request.endpoint, channel, stub, options)
        requested = api_pb2.DevicePluginOptions()
        requested.CopyFrom(request.options)
        with self._cond:
            if epoch != self._epoch:
                stale: _Client | None = client
                previous = None
            else:
                stale = None
                state = self._resources.setdefault(request.resource_name, _ResourceState())
                previous, state.client = state.client, client
                self._registrations.append(
                    Registration(
                        at,
                        request.version,
                        request.endpoint,
                        request.resource_name,
                        options,
                        requested,
                    )
                )
                client.thread = threading.Thread(
                    target=self._watch,
                    args=(client,),
                    name=f"fake-kubelet-law-{request.resource_name}",
                    daemon=True,
                )
                client.thread.start()
                self._cond.notify_all()
        if stale is not None:
            stale.channel.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet is shutting down")
        if previous is not None:
            # A new registration replaces the old endpoint; its stream is no longer ours.
            self._close_clients([previous])
        return api_pb2.Empty()

    def _watch(self, client: _Client) -> None:
        """ListAndWatch loop for one client (kubelet's ``client.Run``)."""
        try:
            for response in client.stub.ListAndWatch(api_pb2.Empty()):
                now = time.monotonic()
                devices = {
                    d.ID: SeenDevice(d.ID, d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in response.devices
                }
                with self._cond:
                    state = self._resources.get(client.resource)
                    if state is None or state.client is not client:
                        return  # replaced or kubelet stopped: the message is not ours to apply
                    state.devices = devices
                    state.updates += 1
                    state.disconnected = False
                    self._cond.notify_all()
                hook = self.on_update
                if hook is not None:
                    try:
                        hook(client.resource, now)
                    except Exception:
                        log.exception("on_update hook failed for %s", client.resource)
            client.error = "stream closed by the plugin"
        except grpc.RpcError as err:
            client.error = _describe(err)
        finally:
            ours = False
            with self._cond:
                state = self._resources.get(client.resource)
                if state is not None and state.client is client:
                    # PluginDisconnected: all devices unhealthy; the endpoint is gone.
                    ours = True
                    state.client = None
                    state.disconnected = True
                    self._cond.notify_all()
            if ours:
                log.info("ListAndWatch ended for %s: %s", client.resource, client.error)
                client.channel.close()

    def _close_clients(self, clients: Sequence[_Client]) -> None:
        for client in clients:
            client.channel.close()
        current = threading.current_thread()
        for client in clients:
            if client.thread is not None and client.thread is not current:
                client.thread.join(timeout=5.0)


def _describe(err: grpc.RpcError) -> str:
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"
    return str(err)
