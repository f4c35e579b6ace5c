"""gpud's control API (``gpud.v1.Gpud``), what ``gpudctl`` talks to: a publisher of the node state.

Every answer comes from the latest snapshot (:class:`~gpud.node.state.NodeState`) and every
change is a request through the daemon's door (:class:`~gpud.node.requests.NodeRequests`), so
this module knows nothing of the daemon. Only fault injection talks to the backend itself, and
only to the simulated one.

Reads are open to anyone who can connect to the socket (root and the socket's group); calls that
change the node need uid 0, checked against the kernel's view of the caller (see
:mod:`gpud.daemon.gateway`), and fail with PERMISSION_DENIED otherwise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc

from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc
from gpud.config.load import ConfigError
from gpud.config.models import AllocationMode
from gpud.daemon.devices_view import DeviceReadingsMixin
from gpud.daemon.gateway import Gateway, peer_uid
from gpud.daemon.simload import SimLoadServicerMixin
from gpud.deviceplugin.plugin import KUBELET_SOCKET
from gpud.health import XidPolicy, unhealthy_reason
from gpud.hw.backend import Backend, FaultInjector
from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.types import GpuInfo
from gpud.mig.layout import export
from gpud.mig.planner import Step
from gpud.node.hub import PublisherLink, PublisherStatus, Update
from gpud.node.requests import MigRequest, Refused, Unavailable
from gpud.node.state import NodeState

if TYPE_CHECKING:
    from gpud.labels.publisher import Published


async def _deny(context: grpc.aio.ServicerContext, what: str) -> NoReturn:
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        f"{what} changes the node and needs root: run it again with sudo",
    )


async def _require_root(context: grpc.aio.ServicerContext, what: str) -> None:
    if peer_uid(context.peer()) != 0:
        await _deny(context, what)


def _step_message(step: Step) -> gpud_pb2.MigStep:
    return gpud_pb2.MigStep(
        action=step.kind,
        gpu=step.gpu,
        detail=step.describe().partition(": ")[2],
        profile=step.profile,
        placement=str(step.placement) if step.placement is not None else "",
        gi_id=-1 if step.gi_id is None else step.gi_id,
        ci_id=-1 if step.ci_id is None else step.ci_id,
    )


def _mig_request(
    request: gpud_pb2.ApplyMigLayoutRequest | gpud_pb2.AssertMigLayoutRequest,
    dry_run: bool = False,
    force: bool = False,
) -> MigRequest:
    return MigRequest(
        config_name=request.config_name,
        config_yaml=request.config_yaml if request.HasField("config_yaml") else None,
        config_source=request.config_source,
        dry_run=dry_run,
        force=force,
    )


def gpu_message(state: NodeState, gpu: GpuInfo) -> gpud_pb2.Gpu:
    reason = state.unhealthy.get(gpu.uuid, "")
    if gpu.lost and not reason:
        reason = "GPU lost"
    return gpud_pb2.Gpu(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        pci_bus_id=gpu.pci_bus_id,
        pci_device_id=gpu.pci_device_id_hex,
        memory_mib=gpu.memory_mib,
        minor_number=gpu.minor_number,
        numa_node=-1 if gpu.numa_node is None else gpu.numa_node,
        health="Unhealthy" if reason else "Healthy",
        health_reason=reason,
        mig_mode=gpu.mig.describe(),
        nvlink_peers=[p.uuid for p in gpu.nvlink_peers],
    )


def publisher_message(status: PublisherStatus) -> gpud_pb2.Publisher:
    return gpud_pb2.Publisher(
        name=status.name,
        state=status.state,
        since_unix=status.since,
        error=status.error,
        failures=status.failures,
        retry_at_unix=status.retry_at or 0.0,
        detail=status.detail,
    )


def status_message(
    state: NodeState, publishers: tuple[PublisherStatus, ...], now: float
) -> gpud_pb2.Status:
    """``gpudctl status`` for a snapshot; ``now`` is time.monotonic(), for the uptime."""
    resources = {rs.resource: rs for rs in state.resources}
    plugins = []
    for p in state.plugins:
        rs = resources.get(p.resource)
        plugins.append(
            gpud_pb2.Plugin(
                resource=p.resource,
                socket=p.socket,
                registered=p.registered,
                devices=len(rs.devices) if rs is not None else 0,
                healthy=rs.healthy_count if rs is not None else 0,
                error=p.error,
            )
        )
    return gpud_pb2.Status(
        version=state.version,
        backend=state.system.backend,
        driver_version=state.system.driver_version,
        cuda_version=state.system.cuda_version,
        backend_error=state.backend_error,
        kubelet_dir=str(state.kubelet_dir),
        kubelet_connected=(state.kubelet_dir / KUBELET_SOCKET).is_socket(),
        gpus=[gpu_message(state, g) for g in state.gpus],
        plugins=plugins,
        config_file=str(state.config_file or ""),
        uptime_s=now - state.started,
        resource_error=state.resource_error,
        publishers=[publisher_message(p) for p in publishers],
        allocation_mode=state.config.allocation.mode.value,
        dra_driver=(
            state.config.dra.driver_name
            if state.config.allocation.mode is AllocationMode.DRA
            else ""
        ),
    )


def mig_state_message(state: NodeState) -> gpud_pb2.MigStateResponse:
    reply = gpud_pb2.MigStateResponse(mig_strategy=state.mig_strategy.value)
    status = state.mig_status
    if status is None:
        return reply
    names = {g.index: g.name for g in state.gpus}
    for layout in state.mig:
        gpu = reply.gpus.add(
            index=layout.gpu_index,
            uuid=layout.gpu_uuid,
            name=names.get(layout.gpu_index, ""),
            mode=layout.mode.describe(),
        )
        for gi in layout.instances:
            for ci in gi.compute_instances:
                gpu.instances.add(
                    gi_id=gi.gi_id,
                    ci_id=ci.ci_id,
                    profile=ci.profile,
                    placement=str(gi.placement),
                    mig_uuid=ci.mig_uuid,
                )
    reply.export_yaml = export([layout.raw for layout in state.mig])
    reply.lock_longest_held_s = status.lock_longest_held_s
    reply.lock_longest_held_by = status.lock_longest_held_by
    if status.store_error:
        reply.last_error = status.store_error
        return reply
    reply.selected_config, reply.selected_source = status.selected, status.selected_source
    reply.selected_origin, reply.label = status.selected_origin, status.label
    if status.last_apply:
        reply.last_apply = f"{status.last_apply} ({status.last_layout})"
        reply.last_error = status.last_error
    return reply


class ControlServicer(SimLoadServicerMixin, DeviceReadingsMixin, gpud_pb2_grpc.GpudServicer):
    """``backend`` is read for ``top`` and used for fault injection, which only the simulated
    backend offers."""

    def __init__(
        self,
        link: PublisherLink,
        backend: Backend,
        labels: Callable[[], Published | None] = lambda: None,
    ) -> None:
        self.link = link
        self.backend = backend
        self.labels = labels

    async def GetStatus(
        self, request: gpud_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.Status:
        return status_message(self.link.latest(), self.link.publishers(), time.monotonic())

    async def SetDeviceHealthy(
        self, request: gpud_pb2.SetDeviceHealthyRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.SetDeviceHealthyResponse:
        await _require_root(context, "device set-healthy")
        try:
            gpu, message = await self.link.requests.set_healthy(request.uuid)
        except KeyError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no GPU with UUID {request.uuid!r} on this node; 'gpudctl devices' lists them",
            )
        except LookupError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        state = self.link.latest()
        gpu = next((g for g in state.gpus if g.uuid == gpu.uuid), gpu)
        return gpud_pb2.SetDeviceHealthyResponse(gpu=gpu_message(state, gpu), message=message)

    async def ReloadConfig(
        self, request: gpud_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.ReloadConfigResponse:
        await _require_root(context, "config reload")
        try:
            path = await self.link.requests.reload()
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return gpud_pb2.ReloadConfigResponse(config_file=str(path or ""))

    # ---- MIG -----------------------------------------------------------------------------------

    async def _unavailable(self, context: grpc.aio.ServicerContext, exc: Unavailable) -> NoReturn:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"MIG unavailable: {exc}")

    async def ApplyMigLayout(
        self, request: gpud_pb2.ApplyMigLayoutRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.ApplyMigLayoutResponse:
        if not request.dry_run:
            await _require_root(context, "mig apply")
        try:
            outcome = await self.link.requests.apply_mig(
                _mig_request(request, request.dry_run, request.force)
            )
        except Unavailable as exc:
            await self._unavailable(context, exc)
        return gpud_pb2.ApplyMigLayoutResponse(
            result=outcome.result,
            mutations=outcome.mutations,
            plan=[_step_message(s) for s in outcome.steps],
            message=outcome.message,
            error_kind=outcome.error_kind,
            in_use_by=list(outcome.in_use_by),
        )

    async def AssertMigLayout(
        self, request: gpud_pb2.AssertMigLayoutRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.AssertMigLayoutResponse:
        try:
            found = await self.link.requests.assert_mig(_mig_request(request))
        except Unavailable as exc:
            await self._unavailable(context, exc)
        except Refused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return gpud_pb2.AssertMigLayoutResponse(applied=not found, differences=found)

    async def GetMigState(
        self, request: gpud_pb2.GetMigStateRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.MigStateResponse:
        return mig_state_message(await self.link.requests.refresh_mig())

    # ---- fault injection (simulated backend only) ----------------------------------------------

    def _injector(self) -> FaultInjector | None:
        return self.backend if isinstance(self.backend, FaultInjector) else None

    async def _no_injector(self, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"fault injection needs the simulated backend (gpud run --simulate MACHINE); "
            f"this gpud runs the {self.backend.name} backend",
        )

    async def _hw_error(self, context: grpc.aio.ServicerContext, exc: HwError) -> NoReturn:
        code = (
            grpc.StatusCode.INVALID_ARGUMENT
            if exc.kind is ErrorKind.INVALID_ARGUMENT
            else grpc.StatusCode.FAILED_PRECONDITION
        )
        await context.abort(code, str(exc))

    async def InjectXid(
        self, request: gpud_pb2.InjectXidRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.InjectXidResponse:
        await _require_root(context, "debug inject-xid")
        injector = self._injector()
        if injector is None:
            await self._no_injector(context)
        scope = {key: getattr(request, key) for key in ("gi_id", "ci_id") if request.HasField(key)}
        try:
            event = injector.inject_xid(request.gpu_index, request.xid, **scope)
        except HwError as exc:
            await self._hw_error(context, exc)
        state = await self.link.requests.reconciled()
        policy = XidPolicy.from_config(state.config.health)
        return gpud_pb2.InjectXidResponse(
            uuid=event.uuid, marked_unhealthy=unhealthy_reason(event, policy) is not None
        )

    async def InjectGpuLost(
        self, request: gpud_pb2.InjectGpuLostRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.InjectGpuLostResponse:
        await _require_root(context, "debug inject-gpu-lost")
        injector = self._injector()
        if injector is None:
            await self._no_injector(context)
        try:
            event = injector.inject_gpu_lost(request.gpu_index)
        except HwError as exc:
            await self._hw_error(context, exc)
        await self.link.requests.reconciled()
        return gpud_pb2.InjectGpuLostResponse(uuid=event.uuid)

    async def InjectProcess(
        self, request: gpud_pb2.InjectProcessRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.InjectProcessResponse:
        await _require_root(context, "debug inject-process")
        from gpud.hw.sim.backend import SimBackend

        backend = self.backend
        if not isinstance(backend, SimBackend):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "fault injection needs the simulated backend (gpud run --simulate MACHINE)",
            )
        faults = backend.faults()
        entry = (request.gpu_index, request.pid, request.mig_uuid or None)
        others = tuple(p for p in faults.processes if p[:2] != entry[:2])
        processes = others if request.remove else (*others, entry)
        try:
            backend.set_faults(dataclasses.replace(faults, processes=processes))
        except HwError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return gpud_pb2.InjectProcessResponse()

    async def GetLabels(
        self, request: gpud_pb2.GetLabelsRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.GetLabelsResponse:
        published = self.labels()
        if published is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "gpud has not computed the node labels yet (it is starting); try again",
            )
        return gpud_pb2.GetLabelsResponse(
            labels=dict(published.labels),
            nfd_file=str(published.nfd_file or ""),
            detail=published.detail,
        )


class ControlApi:
    """The control API as a publisher: it serves the socket from ``start`` to ``stop`` and
    answers from the latest snapshot, so an update needs no work of its own."""

    name = "control-api"

    def __init__(
        self,
        socket: Path,
        group: str,
        backend: Backend,
        labels: Callable[[], Published | None] = lambda: None,
    ) -> None:
        self._gateway = Gateway(socket, group)
        self._backend = backend
        self._labels = labels
        self._server: grpc.aio.Server | None = None

    async def start(self, link: PublisherLink) -> None:
        """Serve the control API behind the gateway; raises SocketInUse when another process
        (a second gpud) serves the socket."""
        address = self._gateway.prepare()
        server = grpc.aio.server()
        gpud_pb2_grpc.add_GpudServicer_to_server(
            ControlServicer(link, self._backend, self._labels), server
        )
        server.add_insecure_port(address)
        await server.start()
        self._server = server
        await self._gateway.start()
        link.set_detail(str(self._gateway.public))

    async def publish(self, update: Update) -> None:
        return None

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
        await self._gateway.stop()
