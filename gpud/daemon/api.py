"""gpud's control API (``gpud.v1.Gpud``), what ``gpudctl`` talks to.

Reads are open to anyone who can connect to the socket (root and the socket's group); calls that
change the node need uid 0, checked against the kernel's view of the caller (see
:mod:`gpud.daemon.gateway`), and fail with PERMISSION_DENIED otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NoReturn

import grpc

from gpud import __version__
from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc
from gpud.config.load import ConfigError
from gpud.daemon.gateway import Gateway, peer_uid
from gpud.daemon.mig import MigController, Refused, read_selection
from gpud.daemon.simload import SimLoadServicerMixin
from gpud.health import unhealthy_reason
from gpud.hw.backend import FaultInjector
from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.types import GpuInfo
from gpud.mig.layout import export
from gpud.mig.planner import Step
from gpud.mig.store import Selection, StoreCorrupt

if TYPE_CHECKING:
    from gpud.daemon.daemon import Daemon


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


class MigServicerMixin:
    """The MIG calls of the control API; mixed into ControlServicer."""

    daemon: Daemon

    async def ApplyMigLayout(
        self, request: gpud_pb2.ApplyMigLayoutRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.ApplyMigLayoutResponse:
        if not request.dry_run:
            await _require_root(context, "mig apply")
        mig = await self._mig(context)
        try:
            selection = self._selection(request)
        except Refused as exc:
            return gpud_pb2.ApplyMigLayoutResponse(
                result="failed", message=str(exc), error_kind=exc.kind
            )
        outcome = await mig.apply(selection, request.dry_run, request.force)
        return gpud_pb2.ApplyMigLayoutResponse(
            result=outcome.result,
            mutations=outcome.mutations,
            plan=[_step_message(s) for s in outcome.steps],
            message=outcome.message,
            error_kind=outcome.error_kind,
            in_use_by=list(outcome.in_use_by),
        )

    def _selection(
        self, request: gpud_pb2.ApplyMigLayoutRequest | gpud_pb2.AssertMigLayoutRequest
    ) -> Selection:
        text = request.config_yaml if request.HasField("config_yaml") else None
        return read_selection(
            request.config_name,
            text,
            request.config_source,
            self.daemon.settings.config.mig.config_file,
        )

    async def _mig(self, context: grpc.aio.ServicerContext) -> MigController:
        mig = self.daemon.mig
        if mig is None or self.daemon.backend_error:
            reason = self.daemon.backend_error or "this backend cannot do MIG"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"MIG unavailable: {reason}")
        return mig

    async def AssertMigLayout(
        self, request: gpud_pb2.AssertMigLayoutRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.AssertMigLayoutResponse:
        mig = await self._mig(context)
        try:
            found = await mig.differences(self._selection(request))
        except Refused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return gpud_pb2.AssertMigLayoutResponse(applied=not found, differences=found)

    async def GetMigState(
        self, request: gpud_pb2.GetMigStateRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.MigStateResponse:
        d = self.daemon
        reply = gpud_pb2.MigStateResponse(
            mig_strategy=d.settings.config.device_plugin.mig_strategy.value
        )
        if d.mig is None:
            return reply
        states = await d.mig.current_states() if not d.backend_error else {}
        names = {g.index: g.name for g in d.gpus}
        for index, state in sorted(states.items()):
            by_id = {p.profile_id: p for p in state.profiles}
            gpu = reply.gpus.add(
                index=index, uuid=state.uuid, name=names.get(index, ""), mode=state.mode.describe()
            )
            for gi in state.instances:
                profile = by_id.get(gi.profile_id)
                cis = {c.profile_id: c.name for c in profile.compute_profiles} if profile else {}
                for ci in gi.compute_instances:
                    gpu.instances.add(
                        gi_id=gi.gi_id,
                        ci_id=ci.ci_id,
                        profile=cis.get(ci.profile_id, "?"),
                        placement=str(gi.placement),
                        mig_uuid=ci.mig_uuid,
                    )
        reply.export_yaml = export(list(states.values()))
        reply.lock_longest_held_s, reply.lock_longest_held_by = d.mig.longest_hold
        try:
            selection = d.mig.store.selection()
            journal = d.mig.store.journal()
        except StoreCorrupt as exc:
            reply.last_error = str(exc)
            return reply
        if selection is not None:
            reply.selected_config, reply.selected_source = selection.name, selection.source
        if journal is not None:
            reply.last_apply = f"{journal.status} ({journal.selection.name})"
            reply.last_error = journal.error
        return reply

    async def InjectProcess(
        self, request: gpud_pb2.InjectProcessRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.InjectProcessResponse:
        await _require_root(context, "debug inject-process")
        from gpud.hw.sim.backend import SimBackend

        backend = self.daemon.backend
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


class ControlServicer(MigServicerMixin, SimLoadServicerMixin, gpud_pb2_grpc.GpudServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _gpu(self, gpu: GpuInfo) -> gpud_pb2.Gpu:
        reason = self.daemon.reasons.get(gpu.uuid, "")
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

    async def GetStatus(
        self, request: gpud_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.Status:
        d = self.daemon
        return gpud_pb2.Status(
            version=__version__,
            backend=d.backend.name,
            driver_version=d.system.driver_version,
            cuda_version=d.system.cuda_version,
            backend_error=d.backend_error,
            kubelet_dir=str(d.settings.kubelet_dir),
            kubelet_connected=d.manager.kubelet_present(),
            gpus=[self._gpu(g) for g in d.gpus],
            plugins=[
                gpud_pb2.Plugin(
                    resource=p.resource,
                    socket=p.socket,
                    registered=p.registered,
                    devices=p.devices,
                    healthy=p.healthy,
                    error=p.error,
                )
                for p in d.manager.statuses()
            ],
            config_file=str(d.settings.config_file or ""),
            uptime_s=d.uptime(),
            resource_error=d.resource_error,
        )

    async def SetDeviceHealthy(
        self, request: gpud_pb2.SetDeviceHealthyRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.SetDeviceHealthyResponse:
        await _require_root(context, "device set-healthy")
        try:
            gpu, message = await self.daemon.set_healthy(request.uuid)
        except KeyError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no GPU with UUID {request.uuid!r} on this node; 'gpudctl devices' lists them",
            )
        except LookupError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return gpud_pb2.SetDeviceHealthyResponse(gpu=self._gpu(gpu), message=message)

    def _injector(self) -> FaultInjector | None:
        backend = self.daemon.backend
        return backend if isinstance(backend, FaultInjector) else None

    async def _no_injector(self, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"fault injection needs the simulated backend (gpud run --simulate MACHINE); "
            f"this gpud runs the {self.daemon.backend.name} backend",
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
        await self.daemon.reconcile()
        return gpud_pb2.InjectXidResponse(
            uuid=event.uuid,
            marked_unhealthy=unhealthy_reason(event, self.daemon.policy) is not None,
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
        await self.daemon.reconcile()
        return gpud_pb2.InjectGpuLostResponse(uuid=event.uuid)

    async def ReloadConfig(
        self, request: gpud_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.ReloadConfigResponse:
        await _require_root(context, "config reload")
        try:
            path = await self.daemon.reload()
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return gpud_pb2.ReloadConfigResponse(config_file=str(path or ""))


async def serve_api(daemon: Daemon, gateway: Gateway) -> grpc.aio.Server:
    """Serve the control API behind ``gateway``; returns the running gRPC server."""
    address = gateway.prepare()
    server = grpc.aio.server()
    gpud_pb2_grpc.add_GpudServicer_to_server(ControlServicer(daemon), server)
    server.add_insecure_port(address)
    await server.start()
    await gateway.start()
    return server
