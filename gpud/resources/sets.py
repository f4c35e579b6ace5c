"""Every resource gpud advertises: whole GPUs, MIG devices per MIG strategy, time-sliced replicas.

One pure function, :func:`build_resource_sets`, decides it from the inventory, the MIG layouts,
the health record and the configuration, with the NVIDIA device plugin's meanings (so a node moved
from it advertises the same resources):

* ``migStrategy: none``: every GPU, MIG-enabled or not, is ``nvidia.com/gpu``.
* ``single``: every MIG device is ``nvidia.com/gpu``; GPUs without MIG stay ``nvidia.com/gpu``.
  Refused (:class:`StrategyError`) when GPUs with and without MIG are mixed, when a MIG-enabled
  GPU has no MIG device, or when the MIG devices are not all one profile: one resource name would
  otherwise stand for different things and pods would land on the wrong slice.
* ``mixed``: ``nvidia.com/mig-<profile>`` per profile ("+" becomes "."), only for compute
  instances spanning their GPU instance; GPUs without MIG are ``nvidia.com/gpu``. Oddities are
  warnings, not errors, since each resource still means one thing.

Time-slicing then turns each device of a configured resource into ``replicas`` devices
``<id>::<n>``, served under the resource's advertised name.

Health is per device but inherited: a device is unhealthy when its own UUID (a MIG or GPU UUID;
replicas share their original's) or its physical GPU's UUID is recorded unhealthy, or the GPU is
lost. An XID on a GPU thus takes down all its MIG devices and their replicas, while a MIG-scoped
XID (recorded under the MIG UUID) takes down only that MIG device and its replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from gpud.config.models import MAX_RESOURCE_NAME_LENGTH, MigStrategy, Sharing, TimeSlicing
from gpud.hw.types import GpuInfo, MigLayoutState, MigMode
from gpud.resources.allocate import REPLICA_SEPARATOR
from gpud.resources.gpus import GPU_RESOURCE, whole_gpu_devices
from gpud.resources.mig import CapsResolver, MigDevice, MigLayoutError, mig_devices, no_caps
from gpud.resources.types import RESOURCE_DOMAIN, Device, ResourceSet


class StrategyError(Exception):
    """The node's MIG layout cannot be advertised under the configured MIG strategy."""


@dataclass(frozen=True, slots=True)
class ResourcePlan:
    """What to serve, and what an operator should hear about (one line each)."""

    sets: tuple[ResourceSet, ...]
    warnings: tuple[str, ...] = ()

    def by_resource(self) -> dict[str, ResourceSet]:
        return {rs.resource: rs for rs in self.sets}


def mig_resource_name(profile: str) -> str:
    """``nvidia.com/mig-1g.5gb.me`` for profile ``1g.5gb+me`` (mixed strategy)."""
    return f"{RESOURCE_DOMAIN}/mig-{profile.replace('+', '.')}"


def mig_enabled(gpu: GpuInfo) -> bool:
    """MIG mode currently in force; a pending change counts only once the GPU has applied it."""
    return gpu.mig.current is MigMode.ENABLED


def build_resource_sets(
    gpus: Sequence[GpuInfo],
    mig_states: Mapping[int, MigLayoutState],
    unhealthy: Mapping[str, str],
    strategy: MigStrategy = MigStrategy.NONE,
    sharing: Sharing | None = None,
    caps: CapsResolver = no_caps,
) -> ResourcePlan:
    """The resource sets for this node, sorted by resource name, devices in a stable order.

    ``mig_states`` maps a GPU index to its MIG layout (only MIG-enabled GPUs need one; a
    MIG-enabled GPU without an entry has no MIG devices). ``unhealthy`` maps GPU or MIG UUIDs to
    the reason. ``caps`` resolves capability device nodes (see :mod:`gpud.resources.mig`).

    Resources with no devices are not served, as in :func:`gpud.resources.gpus.resource_sets`.
    Raises StrategyError when the strategy cannot represent the node (see the module docstring),
    when a MIG layout cannot be named, or when time-slicing would give two resources one name.
    """
    ordered = sorted(gpus, key=lambda g: g.index)
    warnings: list[str] = []
    if strategy is MigStrategy.NONE:
        base = {GPU_RESOURCE: whole_gpu_devices(ordered, unhealthy)}
    else:
        full = [g for g in ordered if not mig_enabled(g)]
        migs = {
            g.index: _mig_devices_of(g, mig_states.get(g.index), caps)
            for g in ordered
            if mig_enabled(g)
        }
        lost = {g.uuid for g in ordered if g.lost}
        if strategy is MigStrategy.SINGLE:
            base = _single(full, migs, unhealthy, lost)
        else:
            base = _mixed(full, migs, unhealthy, lost, warnings)

    sets = [ResourceSet(name, devices) for name, devices in base.items() if devices]
    time_slicing = sharing.time_slicing if sharing is not None else None
    if time_slicing is not None:
        sets = _time_sliced(sets, time_slicing, warnings)

    names = [rs.resource for rs in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StrategyError(
            f"time-slicing would advertise {', '.join(twice)} twice: a renamed resource "
            "takes the name of one that is already advertised; choose another rename"
        )
    too_long = [n for n in names if len(n) > MAX_RESOURCE_NAME_LENGTH]
    if too_long:
        raise StrategyError(
            f"resource names longer than {MAX_RESOURCE_NAME_LENGTH} characters: "
            + ", ".join(too_long)
        )
    return ResourcePlan(tuple(sorted(sets, key=lambda rs: rs.resource)), tuple(warnings))


def _mig_devices_of(
    gpu: GpuInfo, state: MigLayoutState | None, caps: CapsResolver
) -> tuple[MigDevice, ...]:
    if state is None:
        return ()
    if state.uuid != gpu.uuid:
        raise StrategyError(
            f"MIG layout for GPU {gpu.index} belongs to {state.uuid}, not {gpu.uuid}: "
            "the inventory changed while it was read"
        )
    try:
        return mig_devices(gpu, state, caps)
    except MigLayoutError as exc:
        raise StrategyError(str(exc)) from None


def _mig_device(m: MigDevice, unhealthy: Mapping[str, str], lost: set[str]) -> Device:
    return Device(
        id=m.uuid,
        healthy=m.uuid not in unhealthy and m.gpu_uuid not in unhealthy and m.gpu_uuid not in lost,
        numa_node=m.numa_node,
        gpu_uuid=m.gpu_uuid,
        visible_uuid=m.uuid,
        index=m.index,
        device_paths=m.device_paths,
    )


def _indices(gpus: Iterable[int]) -> str:
    listed = sorted(gpus)
    noun = "GPU" if len(listed) == 1 else "GPUs"
    return f"{noun} {', '.join(str(i) for i in listed)}"


def _have(gpus: Iterable[int]) -> str:
    """``GPU 3 has`` or ``GPUs 3, 4 have``."""
    listed = list(gpus)
    return f"{_indices(listed)} {'has' if len(listed) == 1 else 'have'}"


def single_strategy_problem(full: Iterable[int], migs: Mapping[int, Iterable[str]]) -> str:
    """Why ``migStrategy: single`` cannot advertise a node, "" when it can.

    ``full`` are the indices of GPUs without MIG in force, ``migs`` the profiles of the MIG devices
    of every other GPU. Pure, so that ``mig apply`` asks the same question of the layout it is
    about to make as :func:`build_resource_sets` asks of the node afterwards.
    """
    full = list(full)
    profiles = {i: list(names) for i, names in migs.items()}
    if not profiles:
        return ""
    if full:
        return (
            f"migStrategy single needs every GPU in the same MIG mode, but "
            f"{_have(full)} MIG disabled and {_have(profiles)} it enabled; use migStrategy mixed"
        )
    empty = [i for i, names in profiles.items() if not names]
    if empty:
        return (
            f"migStrategy single: {_have(empty)} MIG enabled but no MIG devices; "
            "create MIG instances or disable MIG there"
        )
    by_profile: dict[str, set[int]] = {}
    for i, names in profiles.items():
        for name in names:
            by_profile.setdefault(name, set()).add(i)
    if len(by_profile) > 1:
        listed = "; ".join(f"{p} on {_indices(by_profile[p])}" for p in sorted(by_profile))
        return (
            f"migStrategy single needs one MIG profile on the node, found {len(by_profile)}: "
            f"{listed}; use migStrategy mixed"
        )
    return ""


def _single(
    full: Sequence[GpuInfo],
    migs: Mapping[int, tuple[MigDevice, ...]],
    unhealthy: Mapping[str, str],
    lost: set[str],
) -> dict[str, tuple[Device, ...]]:
    if not migs:
        return {GPU_RESOURCE: whole_gpu_devices(full, unhealthy)}
    problem = single_strategy_problem(
        (g.index for g in full), {i: [m.profile for m in devices] for i, devices in migs.items()}
    )
    if problem:
        raise StrategyError(problem)
    devices = tuple(_mig_device(m, unhealthy, lost) for i in sorted(migs) for m in migs[i])
    return {GPU_RESOURCE: devices}


def _mixed(
    full: Sequence[GpuInfo],
    migs: Mapping[int, tuple[MigDevice, ...]],
    unhealthy: Mapping[str, str],
    lost: set[str],
    warnings: list[str],
) -> dict[str, tuple[Device, ...]]:
    out: dict[str, list[Device]] = {GPU_RESOURCE: list(whole_gpu_devices(full, unhealthy))}
    empty = [i for i, devices in migs.items() if not devices]
    if empty:
        warnings.append(f"{_have(empty)} MIG enabled but no MIG devices: nothing to serve")
    partial: list[str] = []
    for i in sorted(migs):
        for m in migs[i]:
            if not m.spans_gi:
                partial.append(f"{m.index} ({m.profile})")
                continue
            out.setdefault(mig_resource_name(m.profile), []).append(_mig_device(m, unhealthy, lost))
    if partial:
        warnings.append(
            "MIG devices whose compute instance does not span its GPU instance are not "
            f"advertised under migStrategy mixed: {', '.join(partial)}"
        )
    return {name: tuple(devices) for name, devices in out.items()}


def still_present(
    sets: Iterable[ResourceSet],
    gpus: Sequence[GpuInfo],
    mig_states: Mapping[int, MigLayoutState],
    unhealthy: Mapping[str, str],
) -> tuple[ResourceSet, ...]:
    """What was advertised, less every device that no longer exists, health brought up to date.

    For a node the configured strategy cannot advertise (:class:`StrategyError`): kubelet keeps
    the resources it had rather than losing them all, but never an ID of a MIG instance that was
    destroyed, or a whole GPU that is in MIG mode now, which it would hand to a pod. A resource
    may be left with no device; its plugin then says so (capacity 0) instead of going away.
    """
    live = {g.uuid for g in gpus if not mig_enabled(g)}
    lost = {g.uuid for g in gpus if g.lost}
    for g in gpus:
        state = mig_states.get(g.index)
        if mig_enabled(g) and state is not None and state.uuid == g.uuid:
            live.update(ci.mig_uuid for gi in state.instances for ci in gi.compute_instances)
    return tuple(
        replace(
            rs,
            devices=tuple(
                replace(
                    d,
                    healthy=d.visible_uuid not in unhealthy
                    and d.gpu_uuid not in unhealthy
                    and d.gpu_uuid not in lost,
                )
                for d in rs.devices
                if d.visible_uuid in live
            ),
        )
        for rs in sets
    )


def replicas_of(device: Device, count: int) -> tuple[Device, ...]:
    """``count`` replicas ``<id>::0`` .. ``<id>::<count-1>`` of ``device``.

    Each keeps the original's health, NUMA node, paths and UUIDs: a replica is only another
    reference to the same GPU or MIG device, which is what Allocate hands to the runtime.
    """
    return tuple(
        Device(
            id=f"{device.id}{REPLICA_SEPARATOR}{n}",
            healthy=device.healthy,
            numa_node=device.numa_node,
            gpu_uuid=device.gpu_uuid,
            visible_uuid=device.visible_uuid,
            index=device.index,
            device_paths=device.device_paths,
            replica=n,
        )
        for n in range(count)
    )


def base_id(device_id: str) -> str:
    """The GPU or MIG UUID behind a device ID: ``<id>::<n>`` loses its ``::<n>``."""
    return device_id.split(REPLICA_SEPARATOR, 1)[0]


def _time_sliced(
    sets: Sequence[ResourceSet], time_slicing: TimeSlicing, warnings: list[str]
) -> list[ResourceSet]:
    by_name = {rs.resource: rs for rs in sets}
    replicated: dict[str, ResourceSet] = {}
    for i, entry in enumerate(time_slicing.resources):
        rs = by_name.get(entry.name)
        if rs is None:
            warnings.append(
                f"sharing.timeSlicing.resources[{i}]: {entry.name} is not advertised on this "
                "node, nothing to time-slice"
            )
            continue
        devices = tuple(r for d in rs.devices for r in replicas_of(d, entry.replicas))
        replicated[entry.name] = ResourceSet(
            entry.advertised_name(time_slicing.rename_by_default),
            devices,
            fail_requests_greater_than_one=time_slicing.fail_requests_greater_than_one,
        )
    return [replicated.get(rs.resource, rs) for rs in sets]
