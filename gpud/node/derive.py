"""Pure functions from the daemon's working state to the parts of a NodeState, and from two
snapshots to the health events between them. Kept apart from the daemon so that what every
audience is told is decided in one testable place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from gpud.config.models import Sharing
from gpud.hw.types import GpuInfo, MigLayoutState
from gpud.node.events import HealthChanged
from gpud.node.state import (
    DeviceState,
    MigComputeInstance,
    MigInstance,
    MigLayout,
    NodeState,
    SharedResource,
    SharingState,
    XidRecord,
)

UNKNOWN_PROFILE = "?"


def mig_layout(state: MigLayoutState) -> MigLayout:
    """One GPU's MIG layout with profile names resolved, instances in placement order."""
    profiles = {p.profile_id: p for p in state.profiles}
    instances = []
    for gi in sorted(state.instances, key=lambda g: (g.placement.start, g.gi_id)):
        profile = profiles.get(gi.profile_id)
        ci_names = {c.profile_id: c.name for c in profile.compute_profiles} if profile else {}
        instances.append(
            MigInstance(
                gi_id=gi.gi_id,
                profile=profile.name if profile else UNKNOWN_PROFILE,
                profile_id=gi.profile_id,
                placement=gi.placement,
                memory_mib=profile.memory_mib if profile else 0,
                compute_instances=tuple(
                    MigComputeInstance(
                        ci.ci_id,
                        ci_names.get(ci.profile_id, UNKNOWN_PROFILE),
                        ci.slices,
                        ci.mig_uuid,
                    )
                    for ci in sorted(gi.compute_instances, key=lambda c: (c.start, c.ci_id))
                ),
            )
        )
    return MigLayout(state.index, state.uuid, state.mode, tuple(instances), state)


def mig_layouts(states: Mapping[int, MigLayoutState]) -> tuple[MigLayout, ...]:
    return tuple(mig_layout(states[i]) for i in sorted(states))


def device_states(
    gpus: Sequence[GpuInfo],
    layouts: Iterable[MigLayout],
    unhealthy: Mapping[str, str],
    withdrawn: frozenset[str],
    last_xid: Mapping[str, XidRecord],
) -> tuple[DeviceState, ...]:
    """Every GPU, each followed by its MIG devices (when its layout is for this very GPU), with
    effective health: a MIG device inherits its GPU's reason, and a lost GPU is out of service
    even before its loss was recorded."""
    by_gpu = {m.gpu_uuid: m for m in layouts}
    out: list[DeviceState] = []
    for gpu in sorted(gpus, key=lambda g: g.index):
        gpu_reason = unhealthy.get(gpu.uuid) or ("GPU lost" if gpu.lost else "")
        out.append(
            DeviceState(
                uuid=gpu.uuid,
                gpu_uuid=gpu.uuid,
                gpu_index=gpu.index,
                healthy=not gpu_reason,
                reason=gpu_reason,
                withdrawn=gpu.uuid in withdrawn,
                last_xid=last_xid.get(gpu.uuid),
            )
        )
        layout = by_gpu.get(gpu.uuid)
        if layout is None:
            continue
        j = 0
        for gi in layout.instances:
            for ci in gi.compute_instances:
                reason = gpu_reason or unhealthy.get(ci.mig_uuid, "")
                out.append(
                    DeviceState(
                        uuid=ci.mig_uuid,
                        gpu_uuid=gpu.uuid,
                        gpu_index=gpu.index,
                        healthy=not reason,
                        reason=reason,
                        withdrawn=gpu.uuid in withdrawn,
                        last_xid=last_xid.get(ci.mig_uuid),
                        mig_index=j,
                        gi_id=gi.gi_id,
                        ci_id=ci.ci_id,
                        profile=gi.profile,
                        memory_mib=gi.memory_mib,
                    )
                )
                j += 1
    return tuple(out)


def sharing_state(sharing: Sharing) -> SharingState:
    ts = sharing.time_slicing
    if ts is None:
        return SharingState()
    return SharingState(
        strategy="time-slicing",
        resources=tuple(
            SharedResource(r.name, r.advertised_name(ts.rename_by_default), r.replicas)
            for r in ts.resources
        ),
        rename_by_default=ts.rename_by_default,
        fail_requests_greater_than_one=ts.fail_requests_greater_than_one,
    )


def health_changes(
    before: NodeState | None, after: NodeState, at: float
) -> tuple[HealthChanged, ...]:
    """A HealthChanged for every device of ``after`` whose effective health or reason differs
    from ``before``, and for every new device that starts out of service. Devices that went
    away say nothing: the layout event covers them."""
    old = {d.uuid: d for d in before.devices} if before is not None else {}
    changes = []
    for device in after.devices:
        was = old.get(device.uuid)
        if was is None:
            if device.healthy:
                continue
        elif (was.healthy, was.reason) == (device.healthy, device.reason):
            continue
        changes.append(
            HealthChanged(
                at=at,
                uuid=device.uuid,
                gpu_uuid=device.gpu_uuid,
                gpu_index=device.gpu_index,
                healthy=device.healthy,
                reason=device.reason,
                previous_reason=was.reason if was is not None else "",
            )
        )
    return tuple(changes)
