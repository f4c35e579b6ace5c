"""NodePrepareResources and NodeUnprepareResources: kubelet's DRA calls, v1 and v1beta1.

One lock serialises the calls (kubelet may send several pods' claims at once), which keeps the
checkpoint and the CDI directory consistent without finer locking: a call costs a claim read and
a few small files. Each claim gets its own answer; nothing a claim holds can fail the whole call,
because a gRPC error would make kubelet ignore every claim in it. A claim read is bounded by
:data:`CLAIM_READ_TIMEOUT_S`, well inside kubelet's 45 s per call.

A claim already in the checkpoint is answered from it without asking the API server (kubelet
re-prepares every running pod's claims after its own restart, maybe while the API server is
away), and its CDI spec is written again, since ``/var/run/cdi`` is empty after a reboot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gpud._proto.dra.v1 import api_pb2 as v1
from gpud._proto.dra.v1 import api_pb2_grpc as v1_grpc
from gpud._proto.dra.v1beta1 import api_pb2 as v1beta1
from gpud._proto.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from gpud.dra import cdi
from gpud.dra.checkpoint import Checkpoint, PreparedClaim, PreparedDevice
from gpud.dra.prepare import Allocated, ClaimError, allocated, device_edits, in_use
from gpud.node.state import NodeState

log = logging.getLogger(__name__)

CLAIM_READ_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ClaimRef:
    namespace: str
    name: str
    uid: str


# (namespace, name) -> the ResourceClaim as a dict; raises with the sentence for the answer.
ReadClaim = Callable[[str, str], Awaitable[Mapping[str, Any]]]


class DraService:
    """The driver's state on this node: what is prepared, where the specs go."""

    def __init__(
        self,
        driver: str,
        cdi_dir: Path,
        checkpoint: Checkpoint,
        state: Callable[[], NodeState],
        pool: Callable[[], str],
        read_claim: ReadClaim,
        control_nodes: Callable[[], tuple[str, ...]],
    ) -> None:
        self.driver = driver
        self.cdi_dir = cdi_dir
        self.checkpoint = checkpoint
        self._state = state
        self._pool = pool
        self._read_claim = read_claim
        self._control_nodes = control_nodes
        self._lock = asyncio.Lock()

    async def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, PreparedClaim | str]:
        """Each claim UID's prepared devices, or the reason it failed."""
        async with self._lock:
            fresh = {c.uid: c for c in claims if c.uid not in self.checkpoint.claims}
            reads = await asyncio.gather(*(self._read(c) for c in fresh.values()))
            read = dict(zip(fresh, reads, strict=True))
            out: dict[str, PreparedClaim | str] = {}
            changed = False
            for ref in claims:
                try:
                    out[ref.uid] = self._prepare_one(ref, read.get(ref.uid))
                    changed |= ref.uid in fresh
                except (ClaimError, OSError) as exc:
                    log.warning("prepare of claim %s/%s failed: %s", ref.namespace, ref.name, exc)
                    out[ref.uid] = str(exc)
            if changed:
                self._save(out, fresh)
            return out

    async def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        """Each claim UID's error, "" when released (or never prepared: a repeat is fine)."""
        async with self._lock:
            out: dict[str, str] = {}
            for ref in claims:
                try:
                    cdi.remove_spec(self.cdi_dir, ref.uid)
                    self.checkpoint.claims.pop(ref.uid, None)
                    out[ref.uid] = ""
                except OSError as exc:
                    out[ref.uid] = f"cannot remove the CDI spec of claim {ref.uid}: {exc}"
            try:
                self.checkpoint.save()
            except OSError as exc:
                why = f"cannot write {self.checkpoint.path}: {exc}"
                out = {uid: err or why for uid, err in out.items()}
            return out

    def _prepare_one(self, ref: ClaimRef, claim: Mapping[str, Any] | str | None) -> PreparedClaim:
        known = self.checkpoint.claims.get(ref.uid)
        state = self._state()
        if known is not None:
            names = [d.device for d in known.devices]
            edits = [device_edits(state, n) for n in names]
            cdi.write_spec(
                self.cdi_dir, ref.uid, cdi.claim_spec(ref.uid, edits, self._control_nodes())
            )
            return known
        if isinstance(claim, str):
            raise ClaimError(claim)
        assert claim is not None
        wanted = allocated(claim, ref.uid, self.driver, self._pool())
        taken = {uid: [d.device for d in c.devices] for uid, c in self.checkpoint.claims.items()}
        clash = in_use(taken, ref.uid, wanted)
        if clash:
            raise ClaimError(clash)
        devices = _unique_devices(wanted)
        edits = [device_edits(state, d) for d in devices]
        spec = cdi.claim_spec(ref.uid, edits, self._control_nodes())
        cdi.write_spec(self.cdi_dir, ref.uid, spec)
        prepared = PreparedClaim(
            ref.uid,
            ref.namespace,
            ref.name,
            tuple(
                PreparedDevice(
                    tuple(sorted({a.request for a in wanted if a.device == d})),
                    self._pool(),
                    d,
                    (cdi.device_id(ref.uid, d),),
                )
                for d in devices
            ),
        )
        self.checkpoint.claims[ref.uid] = prepared
        return prepared

    async def _read(self, ref: ClaimRef) -> Mapping[str, Any] | str:
        try:
            return await asyncio.wait_for(
                self._read_claim(ref.namespace, ref.name), CLAIM_READ_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            return (
                f"reading claim {ref.namespace}/{ref.name} took longer than "
                f"{CLAIM_READ_TIMEOUT_S:.0f} s"
            )
        except Exception as exc:  # the reader's sentence: 403, 404, no credentials...
            return f"cannot read claim {ref.namespace}/{ref.name}: {exc}"

    def _save(self, out: dict[str, PreparedClaim | str], fresh: Mapping[str, ClaimRef]) -> None:
        """Persist before answering: a claim whose record cannot be written is not prepared
        (its spec stays until kubelet's retry rewrites it or Unprepare removes it)."""
        try:
            self.checkpoint.save()
        except OSError as exc:
            why = f"cannot write {self.checkpoint.path}: {exc}"
            log.error("%s", why)
            for uid in fresh:
                if isinstance(out[uid], PreparedClaim):
                    self.checkpoint.claims.pop(uid, None)
                    out[uid] = why


def _unique_devices(wanted: Sequence[Allocated]) -> list[str]:
    """Device names in allocation order, once each (two requests may share an admin device)."""
    return list(dict.fromkeys(a.device for a in wanted))


def _refs(claims: Sequence[Any]) -> list[ClaimRef]:
    return [ClaimRef(c.namespace, c.name, c.uid) for c in claims]


class DraPluginV1(v1_grpc.DRAPluginServicer):
    """kubelet 1.34+."""

    def __init__(self, service: DraService) -> None:
        self._service = service

    async def NodePrepareResources(
        self, request: v1.NodePrepareResourcesRequest, context: grpc.aio.ServicerContext
    ) -> v1.NodePrepareResourcesResponse:
        results = await self._service.prepare(_refs(request.claims))
        return v1.NodePrepareResourcesResponse(
            claims={uid: _prepared(v1, r) for uid, r in results.items()}
        )

    async def NodeUnprepareResources(
        self, request: v1.NodeUnprepareResourcesRequest, context: grpc.aio.ServicerContext
    ) -> v1.NodeUnprepareResourcesResponse:
        results = await self._service.unprepare(_refs(request.claims))
        return v1.NodeUnprepareResourcesResponse(
            claims={uid: v1.NodeUnprepareResourceResponse(error=e) for uid, e in results.items()}
        )


class DraPluginV1beta1(v1beta1_grpc.DRAPluginServicer):
    """kubelet 1.32 and 1.33 (the same messages without ``share_id``)."""

    def __init__(self, service: DraService) -> None:
        self._service = service

    async def NodePrepareResources(
        self, request: v1beta1.NodePrepareResourcesRequest, context: grpc.aio.ServicerContext
    ) -> v1beta1.NodePrepareResourcesResponse:
        results = await self._service.prepare(_refs(request.claims))
        return v1beta1.NodePrepareResourcesResponse(
            claims={uid: _prepared(v1beta1, r) for uid, r in results.items()}
        )

    async def NodeUnprepareResources(
        self, request: v1beta1.NodeUnprepareResourcesRequest, context: grpc.aio.ServicerContext
    ) -> v1beta1.NodeUnprepareResourcesResponse:
        results = await self._service.unprepare(_refs(request.claims))
        return v1beta1.NodeUnprepareResourcesResponse(
            claims={
                uid: v1beta1.NodeUnprepareResourceResponse(error=e) for uid, e in results.items()
            }
        )


def _prepared(api: Any, result: PreparedClaim | str) -> Any:
    """One claim's answer in ``api``'s messages (v1 or v1beta1: the fields used are the same)."""
    if isinstance(result, str):
        return api.NodePrepareResourceResponse(error=result)
    return api.NodePrepareResourceResponse(
        devices=[
            api.Device(
                request_names=list(d.request_names),
                pool_name=d.pool,
                device_name=d.device,
                cdi_device_ids=list(d.cdi_ids),
            )
            for d in result.devices
        ]
    )
