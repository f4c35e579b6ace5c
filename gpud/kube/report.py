"""What gpud tells the cluster about its node, as Kubernetes Events: type, reason and a message a
person can act on, for each node event worth a person's attention.

Pure: a batch of :mod:`gpud.node.events` in, :class:`Report` values out. The publisher turns
them into core/v1 Events on gpud's Node after :mod:`gpud.kube.ratelimit` has had its say.

What becomes an Event (docs/cluster.md has the table):

* a critical XID: one Warning per XID with its number and meaning and the devices it took out of
  service (the health changes it caused say nothing more). Application XIDs (13, 31, 43, 45,
  68, 109 by default) take nothing out of service and send nothing: they are the workload's
  business and counted in metrics.
* a device going out of service for another reason (the GPU lost): one Warning per GPU, its
  MIG devices named with it; back in service (``gpudctl device set-healthy``): one Normal per
  GPU. A reason that changes while the device stays out sends nothing.
* a MIG apply that starts, succeeds, fails or is refused (naming what blocks it).
* the driver unusable (Warning), and usable again after that (Normal); a container-toolkit
  problem that breaks the configured device-list strategy (Warning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpud.node.events import (
    BackendLost,
    BackendOpened,
    HealthChanged,
    MigApplyStarted,
    MigLayoutApplied,
    MigLayoutFailed,
    MigLayoutRefused,
    MigLayoutWaiting,
    NodeEvent,
    ToolkitProblem,
    XidSeen,
)
from gpud.xids import xid_meaning

NORMAL = "Normal"
WARNING = "Warning"
# kubectl describe shows a message whole; a longer one is cut, saying so.
MAX_MESSAGE = 1024

XID_ERROR = "GPUXidError"
GPU_LOST = "GPULost"
GPU_UNHEALTHY = "GPUUnhealthy"
BACK_IN_SERVICE = "GPUBackInService"
MIG_STARTED = "MigApplyStarted"
MIG_SUCCEEDED = "MigApplySucceeded"
MIG_FAILED = "MigApplyFailed"
MIG_REFUSED = "MigApplyRefused"
MIG_WAITING = "MigApplyWaiting"
DRIVER_UNAVAILABLE = "GPUDriverUnavailable"
DRIVER_READY = "GPUDriverReady"
TOOLKIT_MISSING = "ContainerToolkitProblem"

# The subject of events that concern the node rather than one GPU.
MIG_SUBJECT = "mig"
DRIVER_SUBJECT = "driver"
TOOLKIT_SUBJECT = "toolkit"


@dataclass(frozen=True, slots=True)
class Report:
    """One Event to send. ``subject`` is what it is about (a GPU UUID, "mig", "driver"): rate
    limits count per (reason, subject). ``at`` is when it happened (wall clock)."""

    type: str
    reason: str
    message: str
    subject: str
    at: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.reason, self.subject)


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    if len(message) <= limit:
        return message
    cut = " … (cut short)"
    return message[: limit - len(cut)] + cut


def reports(
    events: Sequence[NodeEvent], driver_lost: bool = False
) -> tuple[tuple[Report, ...], bool]:
    """The Events for ``events`` (oldest first), and whether the driver is lost after them.

    ``driver_lost`` says whether it was lost before the batch: only a driver found again after
    a loss is worth a Normal event (not every start of gpud).
    """
    # Health changes of one GPU and its MIG devices in one batch are one Event, in the place
    # of the first of them: ``order`` holds a Report, or the key of such a group.
    order: list[Report | tuple[str, bool]] = []
    health: dict[tuple[str, bool], list[HealthChanged]] = {}
    for event in events:
        if isinstance(event, HealthChanged):
            if _worth_reporting(event):
                key = (event.gpu_uuid, event.healthy)
                if key not in health:
                    health[key] = []
                    order.append(key)
                health[key].append(event)
            continue
        if isinstance(event, BackendLost):
            driver_lost = True
        report = _single(event, driver_lost)
        if isinstance(event, BackendOpened):
            driver_lost = False
        if report is not None:
            order.append(report)
    out = tuple(item if isinstance(item, Report) else _health(health[item]) for item in order)
    return out, driver_lost


def _worth_reporting(event: HealthChanged) -> bool:
    if event.healthy:
        return bool(event.previous_reason)
    if event.previous_reason:
        return False  # still out, for a reason said in other words
    # An XID that takes a device out is reported by its XidSeen, with the number and meaning.
    return not event.reason.startswith("critical XID")


def _health(group: list[HealthChanged]) -> Report:
    first = group[0]
    gpu = next((e for e in group if e.uuid == e.gpu_uuid), None)
    migs = [e.uuid for e in group if e.uuid != e.gpu_uuid]
    if first.healthy:
        if gpu is not None:
            what = f"GPU {first.gpu_index} ({first.gpu_uuid})"
            if migs:
                what += f" and its {_count(len(migs), 'MIG device')}"
            was = gpu.previous_reason
        else:
            what = f"{', '.join(migs)} (on GPU {first.gpu_index})"
            was = first.previous_reason
        verb = "are" if migs and (gpu is not None or len(migs) > 1) else "is"
        message = f"{what} {verb} back in service (out before: {was}); kubelet sees it Healthy"
        return Report(NORMAL, BACK_IN_SERVICE, clip(message), first.gpu_uuid, first.at)
    reason_text = (gpu or first).reason
    lost = reason_text.startswith("GPU lost")
    if gpu is not None:
        message = f"GPU {first.gpu_index} ({first.gpu_uuid}) is out of service: {reason_text}"
        if migs:
            message += f"; its {_count(len(migs), 'MIG device')} with it"
    else:
        message = f"{', '.join(migs)} (on GPU {first.gpu_index}) out of service: {reason_text}"
    message += ". kubelet sees it Unhealthy and schedules no new pod on it"
    if not lost:
        message += f"; once repaired: gpudctl device set-healthy {(gpu or first).uuid}"
    reason = GPU_LOST if lost else GPU_UNHEALTHY
    return Report(WARNING, reason, clip(message), first.gpu_uuid, first.at)


def _single(event: NodeEvent, driver_lost: bool) -> Report | None:
    if isinstance(event, XidSeen):
        return _xid(event) if event.critical else None
    if isinstance(event, MigApplyStarted):
        message = (
            f"applying MIG layout {event.layout!r}{_from(event.source)}: {event.steps} NVML "
            f"calls on {_gpus(event.gpus)}"
        )
        if event.withdrawn:
            message += (
                f"; the devices of {_count(len(event.withdrawn), 'GPU')} are withdrawn from "
                "kubelet until it is done"
            )
        return Report(NORMAL, MIG_STARTED, clip(message), MIG_SUBJECT, event.at)
    if isinstance(event, MigLayoutApplied):
        message = (
            f"MIG layout {event.layout!r}{_from(event.source)} applied on {_gpus(event.gpus)} "
            f"with {event.mutations} NVML calls in {event.duration_s:.1f} s"
        )
        return Report(NORMAL, MIG_SUCCEEDED, clip(message), MIG_SUBJECT, event.at)
    if isinstance(event, MigLayoutFailed):
        message = (
            f"MIG layout {event.layout!r}{_from(event.source)} failed after {event.mutations} "
            f"NVML calls: {event.message}"
        )
        return Report(WARNING, MIG_FAILED, clip(message), MIG_SUBJECT, event.at)
    if isinstance(event, MigLayoutRefused):
        return _refused(event)
    if isinstance(event, MigLayoutWaiting):
        message = (
            f"MIG layout {event.layout!r}{_from(event.source)} waits up to {event.wait_s:.0f} s "
            f"for its devices to be free; nothing was changed yet. In use by: "
            + "; ".join(event.in_use_by)
            + ". Drain these pods (or set the label back) and the change goes through"
        )
        return Report(WARNING, MIG_WAITING, clip(message), MIG_SUBJECT, event.at)
    if isinstance(event, BackendLost):
        message = (
            f"the GPUs cannot be used ({event.backend} backend): {event.error}. No GPU is "
            "advertised to kubelet until this is fixed; gpud opens the GPUs by itself once the "
            "driver loads"
        )
        return Report(WARNING, DRIVER_UNAVAILABLE, clip(message), DRIVER_SUBJECT, event.at)
    if isinstance(event, BackendOpened):
        if not driver_lost:
            return None
        driver = event.system.driver_version or "version unknown"
        message = (
            f"the GPU driver is usable again ({event.system.backend} backend, driver {driver}): "
            f"{_count(event.gpu_count, 'GPU')} advertised to kubelet"
        )
        return Report(NORMAL, DRIVER_READY, clip(message), DRIVER_SUBJECT, event.at)
    if isinstance(event, ToolkitProblem):
        return Report(WARNING, TOOLKIT_MISSING, clip(event.message), TOOLKIT_SUBJECT, event.at)
    return None


def _xid(event: XidSeen) -> Report:
    scope = "" if event.gi_id is None else f", GPU instance {event.gi_id}"
    if event.ci_id is not None:
        scope += f" compute instance {event.ci_id}"
    message = (
        f"XID {event.xid} on GPU {event.gpu_index} ({event.gpu_uuid}){scope}: "
        f"{xid_meaning(event.xid)}."
    )
    if event.detail:
        message += f" Driver: {event.detail}."
    if event.devices == (event.gpu_uuid,):
        target = event.gpu_uuid
        message += " The GPU (with any MIG devices on it) is out of service"
    else:
        target = event.devices[0] if event.devices else event.gpu_uuid
        message += f" Out of service: {', '.join(event.devices)}"
    message += (
        "; kubelet sees it Unhealthy and schedules no new pod on it. Once repaired: gpudctl "
        f"device set-healthy {target}"
    )
    return Report(WARNING, XID_ERROR, clip(message), event.gpu_uuid, event.at)


def _refused(event: MigLayoutRefused) -> Report:
    first = event.message.split("\n", 1)[0].rstrip(":")
    message = f"MIG layout {event.layout!r}{_from(event.source)} refused, nothing was changed: "
    message += first
    if event.in_use_by:
        message += ". In use by: " + "; ".join(event.in_use_by)
    return Report(WARNING, MIG_REFUSED, clip(message), MIG_SUBJECT, event.at)


def _from(source: str) -> str:
    return f" (from {source})" if source else ""


def _gpus(indexes: Sequence[int]) -> str:
    if not indexes:
        return "no GPU"
    word = "GPU" if len(indexes) == 1 else "GPUs"
    return f"{word} {', '.join(str(i) for i in indexes)}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
