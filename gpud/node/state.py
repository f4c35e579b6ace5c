"""The node as gpud knows it, in one immutable value: what every audience is told.

The daemon derives a new :class:`NodeState` after each change (:mod:`gpud.node.derive`) and hands
it to the publishers. Every part is frozen and none refers to a live object, so a publisher may
keep a snapshot as long as it likes, read it from any thread, and compare two snapshots to find
what changed. Field by field it answers the questions the audiences ask: which GPUs and MIG
devices exist and whether they are healthy (kubelet, metrics, ``gpudctl``), how they are
partitioned and shared (labels), what kubelet was offered and under which IDs (metrics' pod
attribution), and what went wrong (status, Events).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpud.config.models import Config, MigStrategy
from gpud.hw.types import GpuInfo, MigLayoutState, MigState, Placement, SystemInfo
from gpud.resources.types import Device, ResourceSet


@dataclass(frozen=True, slots=True)
class XidRecord:
    """The last XID a device reported, as dcgm-exporter's ``DCGM_FI_DEV_XID_ERRORS`` keeps it.

    ``critical`` says whether gpud's policy took the device out of service for it; application
    XIDs (13, 43, ...) are recorded too. ``at`` is wall-clock time (``time.time()``).
    """

    xid: int
    at: float
    critical: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """One device an audience can name: a whole GPU, or a MIG device (compute instance) on one.

    ``healthy``/``reason`` are the device's effective health: a MIG device is unhealthy when its
    own record or its GPU's says so, or when the GPU is lost, and then ``reason`` says which.
    ``withdrawn`` marks the devices of a GPU whose MIG layout is being changed: kubelet sees
    them Unhealthy meanwhile, but they are not broken. The MIG fields are None for a GPU.
    """

    uuid: str
    gpu_uuid: str
    gpu_index: int
    healthy: bool
    reason: str = ""
    withdrawn: bool = False
    last_xid: XidRecord | None = None
    # MIG devices only: position among the GPU's MIG devices ("i:j" as nvidia-smi numbers them),
    # the GPU and compute instance IDs, the GPU-instance profile ("1g.5gb") and its memory.
    mig_index: int | None = None
    gi_id: int | None = None
    ci_id: int | None = None
    profile: str | None = None
    memory_mib: int | None = None

    @property
    def is_mig(self) -> bool:
        return self.gi_id is not None


@dataclass(frozen=True, slots=True)
class MigComputeInstance:
    ci_id: int
    # "1g.5gb" when the compute instance spans its GPU instance, else its own ("1c.3g.20gb").
    profile: str
    slices: int
    mig_uuid: str


@dataclass(frozen=True, slots=True)
class MigInstance:
    """A GPU instance with its compute instances, profile names resolved ("?" if unknown)."""

    gi_id: int
    profile: str
    profile_id: int
    placement: Placement
    memory_mib: int
    compute_instances: tuple[MigComputeInstance, ...]


@dataclass(frozen=True, slots=True)
class MigLayout:
    """One MIG-capable GPU's partitioning as gpud last read it; ``raw`` is the hardware layer's
    value (what ``gpud.mig.layout.export`` and the planner take)."""

    gpu_index: int
    gpu_uuid: str
    mode: MigState
    instances: tuple[MigInstance, ...]
    raw: MigLayoutState


@dataclass(frozen=True, slots=True)
class MigStatus:
    """What ``gpudctl mig apply`` and the start-up restore have done, from the state directory.

    ``last_apply`` is the journal's status (running, done, failed; "" before the first apply)
    for ``last_layout``; ``applying`` is True while one runs. ``store_error`` is set when the
    state files are unreadable (gpud then refuses to guess).
    """

    selected: str = ""
    selected_source: str = ""
    selected_origin: str = ""
    # The Node's nvidia.com/mig.config while the API link reads one: it then owns the layout.
    label: str = ""
    last_apply: str = ""
    last_layout: str = ""
    last_error: str = ""
    store_error: str = ""
    lock_longest_held_s: float = 0.0
    lock_longest_held_by: str = ""

    @property
    def applying(self) -> bool:
        return self.last_apply == "running"


@dataclass(frozen=True, slots=True)
class SharedResource:
    """A time-sliced resource: every device of ``resource`` is offered ``replicas`` times as
    ``advertised_as`` (the same name, ``<name>.shared`` or the configured rename)."""

    resource: str
    advertised_as: str
    replicas: int

    @property
    def renamed(self) -> bool:
        return self.advertised_as != self.resource


@dataclass(frozen=True, slots=True)
class SharingState:
    """The effective sharing configuration; ``strategy`` is "none" or "time-slicing"."""

    strategy: str = "none"
    resources: tuple[SharedResource, ...] = ()
    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False

    def of(self, resource: str) -> SharedResource | None:
        """The sharing of an unshared resource name (``nvidia.com/gpu``), None when unshared."""
        return next((s for s in self.resources if s.resource == resource), None)


@dataclass(frozen=True, slots=True)
class PluginStatus:
    """One device-plugin socket as the kubelet link reports it.

    ``registering`` is True while a registration with kubelet is in flight; ``error`` is the last
    problem ("waiting for kubelet: ...", "registration failed: ..."), "" once registered. How many
    devices it serves is in :attr:`NodeState.resources`.
    """

    resource: str
    socket: str
    registered: bool
    registering: bool = False
    error: str = ""


@dataclass(frozen=True, slots=True)
class NodeState:
    """Everything gpud tells its audiences, as of ``generation`` (one more per snapshot)."""

    generation: int
    version: str
    # time.monotonic() when the daemon started; uptime is monotonic() minus this.
    started: float
    config: Config
    config_file: Path | None
    kubelet_dir: Path
    pod_resources_socket: Path
    system: SystemInfo
    # Why the backend cannot be used ("no driver: ..."), "" when it works.
    backend_error: str
    gpus: tuple[GpuInfo, ...]
    # The health record: GPU or MIG UUID -> why it is out of service. Absent means healthy
    # unless its GPU is out; `devices` has the effective health of each.
    unhealthy: Mapping[str, str]
    devices: tuple[DeviceState, ...]
    # MIG-capable GPUs (not lost), by index; () when the backend cannot do MIG or has no driver.
    mig: tuple[MigLayout, ...]
    # None when the backend cannot do MIG at all.
    mig_status: MigStatus | None
    # Physical GPU UUIDs whose devices are withdrawn while their MIG layout changes.
    withdrawn: frozenset[str]
    # What kubelet is offered (or, during a MIG apply, will be offered once the pass reaches the
    # kubelet link), by resource name; a device's gpu_uuid and visible_uuid say what is behind
    # a MIG or time-sliced replica ID ("<uuid>::<n>").
    resources: tuple[ResourceSet, ...]
    # Why the devices cannot be advertised as configured (the previous advertisement is kept).
    resource_error: str
    resource_warnings: tuple[str, ...]
    sharing: SharingState
    plugins: tuple[PluginStatus, ...]
    # True once gpud has started: the backend opened (or found unusable), the MIG layout restored
    # and the first reconcile pass under way. Before, the GPUs and their layouts may be partial,
    # and an audience that keeps what it was told (labels) must not take them for the node.
    ready: bool = False

    @property
    def mig_strategy(self) -> MigStrategy:
        return self.config.device_plugin.mig_strategy

    def gpu(self, uuid: str) -> GpuInfo | None:
        """The GPU with this UUID, or the GPU a MIG device of this UUID is on."""
        device = self.device(uuid)
        if device is None:
            return None
        return next((g for g in self.gpus if g.uuid == device.gpu_uuid), None)

    def device(self, uuid: str) -> DeviceState | None:
        """The GPU or MIG device with this UUID."""
        return next((d for d in self.devices if d.uuid == uuid), None)

    def mig_layout(self, gpu_index: int) -> MigLayout | None:
        return next((m for m in self.mig if m.gpu_index == gpu_index), None)

    def resource(self, name: str) -> ResourceSet | None:
        return next((rs for rs in self.resources if rs.resource == name), None)

    def advertised(self, device_id: str) -> tuple[str, Device] | None:
        """The resource and device behind an ID kubelet was given (a GPU or MIG UUID, or a
        time-sliced replica ``<uuid>::<n>``), as PodResources reports it."""
        for rs in self.resources:
            for device in rs.devices:
                if device.id == device_id:
                    return rs.resource, device
        return None
