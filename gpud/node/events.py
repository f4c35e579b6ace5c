"""Typed change events: what happened between two snapshots, for audiences that say so.

A snapshot tells what is; an event tells what happened, with what a publisher needs to say it
(a Kubernetes Event, a journal line) without diffing snapshots itself. Each is frozen, carries
its wall-clock time ``at`` and a one-line :meth:`describe` in gpud's words. Events reach a
publisher together with the snapshot that already reflects them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpud.hw.types import SystemInfo


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """A device's effective health changed (an XID, a lost GPU, ``set-healthy``, a MIG device
    created on a GPU that is out of service). Withdrawal during a MIG apply is not one."""

    at: float
    uuid: str
    gpu_uuid: str
    gpu_index: int
    healthy: bool
    reason: str
    # The reason it was out of service before, "" when it was healthy (or new).
    previous_reason: str = ""

    def describe(self) -> str:
        what = f"GPU {self.gpu_index}" if self.uuid == self.gpu_uuid else f"{self.uuid}"
        if self.healthy:
            return f"{what} is back in service"
        return f"{what} is out of service: {self.reason}"


@dataclass(frozen=True, slots=True)
class XidSeen:
    """An XID from the driver, critical or not. ``devices`` are the UUIDs it is charged to: the
    GPU, or the MIG devices of the instance it was scoped to (``gi_id``/``ci_id``, None when it
    was not scoped)."""

    at: float
    gpu_uuid: str
    gpu_index: int
    xid: int
    devices: tuple[str, ...]
    critical: bool
    gi_id: int | None = None
    ci_id: int | None = None
    detail: str = ""

    def describe(self) -> str:
        scope = "" if self.gi_id is None else f" GPU instance {self.gi_id}"
        effect = "taken out of service" if self.critical else "ignored (application error)"
        return f"XID {self.xid} on GPU {self.gpu_index}{scope}: {effect}"


@dataclass(frozen=True, slots=True)
class MigApplyStarted:
    """A MIG apply (not a dry run) is about to make its first NVML call: ``steps`` calls on
    ``gpus``; the devices of ``withdrawn`` (GPU UUIDs) are withdrawn from kubelet meanwhile."""

    at: float
    layout: str
    source: str
    steps: int
    gpus: tuple[int, ...]
    withdrawn: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"MIG layout {self.layout!r} being applied: {self.steps} NVML calls"


@dataclass(frozen=True, slots=True)
class MigLayoutApplied:
    """A MIG layout was applied with ``mutations`` NVML calls (not sent for no-ops or dry runs)."""

    at: float
    layout: str
    source: str
    mutations: int
    duration_s: float
    gpus: tuple[int, ...]
    message: str

    def describe(self) -> str:
        return f"MIG layout {self.layout!r} applied with {self.mutations} NVML calls"


@dataclass(frozen=True, slots=True)
class MigLayoutFailed:
    """A MIG apply failed part-way: ``mutations`` calls were made, the GPUs hold what
    ``NodeState.mig`` shows."""

    at: float
    layout: str
    source: str
    mutations: int
    duration_s: float
    gpus: tuple[int, ...]
    message: str

    def describe(self) -> str:
        return (
            f"MIG layout {self.layout!r} failed after {self.mutations} NVML calls: {self.message}"
        )


@dataclass(frozen=True, slots=True)
class MigLayoutRefused:
    """A MIG apply was refused before any change: ``kind`` is "invalid" (the layout is wrong or
    does not fit), "refused" (devices in use, or a strategy that cannot advertise the result)."""

    at: float
    layout: str
    source: str
    kind: str
    message: str
    in_use_by: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"MIG layout {self.layout!r} refused ({self.kind}): {self.message}"


@dataclass(frozen=True, slots=True)
class MigLayoutWaiting:
    """A MIG apply found pods or processes holding devices it would destroy and waits up to
    ``wait_s`` for them to leave (``mig.byLabel.waitForPods``) instead of failing at once."""

    at: float
    layout: str
    source: str
    wait_s: float
    in_use_by: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"MIG layout {self.layout!r} waits up to {self.wait_s:.0f} s for "
            f"{len(self.in_use_by)} users of its devices to leave"
        )


@dataclass(frozen=True, slots=True)
class PluginRegistered:
    """kubelet accepted a device plugin; ``again`` when the resource had registered before
    since gpud started (kubelet restarted, or the socket was re-created)."""

    at: float
    resource: str
    endpoint: str
    again: bool

    def describe(self) -> str:
        return f"{self.resource} {'re-registered' if self.again else 'registered'} with kubelet"


@dataclass(frozen=True, slots=True)
class BackendOpened:
    """The hardware backend opened and its GPUs were read (at start, or when the driver came)."""

    at: float
    system: SystemInfo
    gpu_count: int

    def describe(self) -> str:
        driver = self.system.driver_version or "unknown"
        return f"{self.system.backend} backend open: {self.gpu_count} GPUs, driver {driver}"


@dataclass(frozen=True, slots=True)
class BackendLost:
    """The backend cannot be used (no driver, NVML failing); nothing is advertised meanwhile."""

    at: float
    backend: str
    error: str

    def describe(self) -> str:
        return f"{self.backend} backend unusable: {self.error}"


@dataclass(frozen=True, slots=True)
class ToolkitProblem:
    """The container toolkit cannot do what the configuration needs (found at start or when
    the driver came): ``message`` says what breaks and what to do."""

    at: float
    message: str

    def describe(self) -> str:
        return f"container toolkit problem: {self.message}"


@dataclass(frozen=True, slots=True)
class ConfigReloaded:
    """A reload was asked for (SIGHUP, ``gpudctl config reload``); ``error`` is why it was
    refused, "" when the new configuration is in force."""

    at: float
    config_file: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def describe(self) -> str:
        source = self.config_file or "built-in defaults"
        if self.ok:
            return f"configuration reloaded from {source}"
        return f"configuration reload refused, the running one is kept: {self.error}"


NodeEvent = (
    HealthChanged
    | XidSeen
    | MigApplyStarted
    | MigLayoutApplied
    | MigLayoutFailed
    | MigLayoutRefused
    | MigLayoutWaiting
    | PluginRegistered
    | BackendOpened
    | BackendLost
    | ToolkitProblem
    | ConfigReloaded
)
