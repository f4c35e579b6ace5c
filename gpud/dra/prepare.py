"""Prepare's decisions, as pure functions over the claim object and the node state.

kubelet names a claim only by namespace, name and UID; the devices are in the claim's
``status.allocation.devices.results``, written by the scheduler. Of those, gpud prepares the
ones of its own driver in its own pool (the node's name), and refuses a claim that was replaced
since kubelet looked (another UID under the same name), that is not allocated, or that names a
device this node does not have: each as that claim's error, so the pod's events say why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpud.dra.cdi import DeviceEdits
from gpud.dra.devices import dra_devices
from gpud.node.state import NodeState


class ClaimError(Exception):
    """This claim cannot be prepared; ``str()`` is the answer's error text."""


@dataclass(frozen=True, slots=True)
class Allocated:
    """One result of the claim's allocation that is this driver's on this node."""

    request: str  # the claim's request, a subrequest's suffix ("req/sub") stripped
    pool: str
    device: str
    admin_access: bool = False


def allocated(claim: Mapping[str, Any], uid: str, driver: str, pool: str) -> tuple[Allocated, ...]:
    """This driver's devices in ``claim`` (a ResourceClaim as the API server returns it)."""
    meta = claim.get("metadata") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    if meta.get("uid") != uid:
        raise ClaimError(
            f"claim {where} was replaced: its UID is {meta.get('uid')}, kubelet asked for {uid}"
        )
    allocation = (claim.get("status") or {}).get("allocation")
    if not allocation:
        raise ClaimError(f"claim {where} is not allocated")
    results = [r for r in (allocation.get("devices") or {}).get("results") or () if r]
    mine = [r for r in results if r.get("driver") == driver]
    if not mine:
        drivers = sorted({str(r.get("driver")) for r in results})
        raise ClaimError(
            f"claim {where} has no device of driver {driver} (allocated: {', '.join(drivers)})"
        )
    foreign = [r for r in mine if r.get("pool") != pool]
    if foreign:
        names = ", ".join(f"{r.get('pool')}/{r.get('device')}" for r in foreign)
        raise ClaimError(f"claim {where} has devices of another node's pool, not {pool}: {names}")
    return tuple(
        Allocated(
            str(r.get("request", "")).split("/", 1)[0],
            pool,
            str(r.get("device")),
            bool(r.get("adminAccess")),
        )
        for r in mine
    )


def device_edits(state: NodeState, name: str) -> DeviceEdits:
    """The device nodes of the device published as ``name``, found among the devices
    :func:`gpud.dra.devices.dra_devices` publishes now (one naming for slices, Prepare and
    health): its GPU's ``/dev/nvidiaN``."""
    device = next((d for d in dra_devices(state, "") if d.name == name), None)
    if device is None:
        raise ClaimError(
            f"this node publishes no device {name} now (a MIG layout changed since the claim "
            "was allocated, or the GPU is gone)"
        )
    gpu = next(g for g in state.gpus if g.uuid == device.gpu_uuid)
    if gpu.lost:
        raise ClaimError(f"{name} ({gpu.uuid}) fell off the bus: the GPU needs a reset")
    return DeviceEdits(name, (gpu.device_path,))


def in_use(prepared: Mapping[str, Sequence[str]], uid: str, wanted: Sequence[Allocated]) -> str:
    """Why ``wanted`` collides with another claim's prepared devices ("" when it does not):
    the last line of defence against a device handed to two claims. ``prepared`` maps claim
    UIDs to their device names; admin access (monitoring) shares by design."""
    for a in wanted:
        if a.admin_access:
            continue
        for other, devices in prepared.items():
            if other != uid and a.device in devices:
                return f"{a.device} is already prepared for claim {other}"
    return ""
