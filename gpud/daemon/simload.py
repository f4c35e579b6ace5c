"""The control API's ``SetLoad``: set a simulated GPU's or instance's load (``gpudctl debug
set-load``).

Kept apart from :mod:`gpud.daemon.api` because it needs nothing of the node state, only the
backend: the load is the simulated hardware's state, and what reads telemetry sees it at its next
read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from gpud._proto.gpud.v1 import gpud_pb2
from gpud.daemon.gateway import peer_uid
from gpud.hw.backend import LoadSimulator
from gpud.hw.errors import ErrorKind, HwError

if TYPE_CHECKING:
    from gpud.hw.backend import Backend


class SimLoadServicerMixin:
    """Mixed into the control API's servicer, which provides ``backend``."""

    backend: Backend

    async def SetLoad(
        self, request: gpud_pb2.SetLoadRequest, context: grpc.aio.ServicerContext
    ) -> gpud_pb2.SetLoadResponse:
        if peer_uid(context.peer()) != 0:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "debug set-load changes the node and needs root: run it again with sudo",
            )
        backend = self.backend
        if not isinstance(backend, LoadSimulator):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "setting a load needs the simulated backend (gpud run --simulate MACHINE); "
                f"this gpud runs the {backend.name} backend",
            )
        try:
            load = await asyncio.to_thread(
                backend.set_load,
                request.gpu_index,
                request.gi_id if request.HasField("gi_id") else None,
                utilization_pct=(
                    request.utilization_pct if request.HasField("utilization_pct") else None
                ),
                memory_used_mib=(
                    request.memory_used_mib if request.HasField("memory_used_mib") else None
                ),
                automatic=request.automatic,
            )
        except HwError as exc:
            invalid = exc.kind is ErrorKind.INVALID_ARGUMENT
            code = (
                grpc.StatusCode.INVALID_ARGUMENT if invalid else grpc.StatusCode.FAILED_PRECONDITION
            )
            await context.abort(code, str(exc))
        uuid = next((g.uuid for g in backend.gpus() if g.index == request.gpu_index), "")
        return gpud_pb2.SetLoadResponse(uuid=uuid, load=load)
