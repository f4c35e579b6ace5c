"""Which hardware events take a GPU out of service, and the record of why a GPU is out.

Kept pure so the daemon's reconcile loop and the tests share one definition of "critical". Unlike
NVIDIA's device plugin, a GPU marked unhealthy here can be returned to service
(``gpudctl device set-healthy``) after a repair, without restarting anything.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from gpud.config.models import Health
from gpud.hw.types import EventKind, GpuInfo, HwEvent


@dataclass(frozen=True, slots=True)
class XidPolicy:
    """Application-caused XIDs are ignored; every other XID means the GPU needs attention."""

    ignored: frozenset[int]
    forced: frozenset[int]

    @classmethod
    def from_config(cls, health: Health) -> XidPolicy:
        return cls(
            ignored=frozenset(health.ignored_xids) | frozenset(health.extra_ignored_xids),
            forced=frozenset(health.critical_xids),
        )

    def is_critical(self, xid: int) -> bool:
        return xid in self.forced or xid not in self.ignored


def unhealthy_reason(event: HwEvent, policy: XidPolicy) -> str | None:
    """The reason ``event`` takes its GPU out of service, or None when it does not."""
    if event.kind is EventKind.GPU_LOST:
        return "GPU lost: it fell off the bus; reset the GPU or reboot the node"
    if policy.is_critical(event.xid):
        where = ""
        if event.gi_id != 0xFFFFFFFF:
            where = f" on GPU instance {event.gi_id}"
        return f"critical XID {event.xid}{where}"
    return None


def initial_reasons(
    gpus: Iterable[GpuInfo], known: Mapping[str, str], mig_uuids: Collection[str] = ()
) -> dict[str, str]:
    """Health reasons for a fresh inventory: what was already known, plus boards NVML lost.

    Reasons for GPUs and MIG devices (``mig_uuids``: those that exist now) that are no longer
    present are dropped, so a replaced board or a re-created instance starts clean; a MIG
    device's own reason survives every refresh while the instance exists.
    """
    present = {gpu.uuid: gpu for gpu in gpus}
    reasons = {uuid: why for uuid, why in known.items() if uuid in present or uuid in mig_uuids}
    for uuid, gpu in present.items():
        if gpu.lost and uuid not in reasons:
            reasons[uuid] = "GPU lost: NVML cannot reach it; reset the GPU or reboot the node"
    return reasons
