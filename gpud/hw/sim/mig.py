"""MIG rules as NVML enforces them, as pure functions over one GPU's MIG state.

Kept apart from the backend's state file and lock so that the rules can be read and tested on their
own: every function takes a GPU's mode, instances and processes plus its family's profile tables
(:mod:`gpud.mig.catalog`) and either returns the new state or raises the :class:`HwError` NVML
would return. The rules are those of shared/reference/mig-profiles.md §4 and §7: GIs sit at one of
their profile's placements, never share a memory slice and never exceed a profile's count; CIs
share their GI's compute slices; anything a process uses cannot be torn down.

Instances are kept sorted by ``gi_id`` and their CIs by ``ci_id``, so two layouts compare equal
exactly when the GPU looks the same.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.types import (
    CiProfile,
    ComputeInstance,
    GiProfile,
    GpuInstance,
    GpuProcess,
    MigMode,
    MigState,
    Placement,
)
from gpud.mig.catalog import Family

MIG_UUID = re.compile(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A MIG device's UUID as NVML prints it (R470+ drivers)."""

CI_PROFILE_COUNT = 9
"""``NVML_COMPUTE_INSTANCE_PROFILE_COUNT``: CI profile IDs equal their enum value (mig-profiles.md
§1.3), so an ID at or past it is one NVML does not know (INVALID_ARGUMENT), while a known ID that a
GI does not offer is NOT_SUPPORTED, as the profile lookup answers."""

Instances = tuple[GpuInstance, ...]


def new_mig_uuid(taken: Iterable[str] = ()) -> str:
    """A fresh random MIG device UUID, different from every one in ``taken``."""
    taken = set(taken)
    while True:
        digits = os.urandom(16).hex()
        uuid = f"MIG-{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
        if uuid not in taken:
            return uuid


def mig_uuids(instances: Instances) -> list[str]:
    return [ci.mig_uuid for gi in instances for ci in gi.compute_instances]


def _gi_profile(family: Family, profile_id: int) -> GiProfile | None:
    for profile in family.profiles:
        if profile.profile_id == profile_id:
            return profile
    return None


def _ci_profile(profile: GiProfile, ci_profile_id: int) -> CiProfile | None:
    for ci in profile.compute_profiles:
        if ci.profile_id == ci_profile_id:
            return ci
    return None


def _find_gi(instances: Instances, gi_id: int) -> GpuInstance:
    for gi in instances:
        if gi.gi_id == gi_id:
            return gi
    raise HwError(ErrorKind.NOT_FOUND, f"there is no GPU instance {gi_id}")


def _placements(profile: GiProfile) -> str:
    return ", ".join(str(p) for p in profile.placements)


# ---- mode and reset -----------------------------------------------------------------------------


def set_mode(
    family: Family | None,
    mode: MigState,
    instances: Instances,
    processes: tuple[GpuProcess, ...],
    enabled: bool,
) -> MigState:
    """The mode after ``nvmlDeviceSetMigMode``.

    Ampere boards only record the request (``pending``) until a GPU reset; Hopper and later switch
    at once. Asking for the mode already pending succeeds and changes nothing, as NVML does.
    """
    if family is None or not mode.capable:
        raise HwError(ErrorKind.NOT_SUPPORTED, "this GPU cannot do MIG")
    if processes:
        raise HwError(
            ErrorKind.IN_USE,
            f"{len(processes)} process(es) use the GPU; stop them before changing the MIG mode",
        )
    target = MigMode.ENABLED if enabled else MigMode.DISABLED
    if not enabled and instances:
        raise HwError(
            ErrorKind.IN_USE,
            f"{len(instances)} GPU instance(s) exist; destroy them before disabling MIG",
        )
    if family.mode_change_needs_reset:
        return MigState(mode.current, target)
    return MigState(target, target)


def reset(mode: MigState, processes: tuple[GpuProcess, ...]) -> MigState:
    """The mode after a GPU reset: the pending mode takes effect (instances never survive one)."""
    if processes:
        raise HwError(
            ErrorKind.IN_USE, f"{len(processes)} process(es) use the GPU; stop them before a reset"
        )
    return MigState(mode.pending, mode.pending)


# ---- GPU instances ------------------------------------------------------------------------------


def check_gpu_instance(
    family: Family, instances: Instances, profile_id: int, placement: Placement
) -> GiProfile:
    """The profile of a GI that may be created at ``placement`` next to ``instances``.

    INVALID_ARGUMENT for what is wrong whatever else is on the GPU (profile, placement);
    INSUFFICIENT_RESOURCES for what other GIs take away (count, memory slices), as NVML sorts them.
    """
    profile = _gi_profile(family, profile_id)
    if profile is None:
        known = ", ".join(f"{p.profile_id} ({p.name})" for p in family.profiles)
        raise HwError(
            ErrorKind.INVALID_ARGUMENT,
            f"no GPU instance profile {profile_id} on {family.name}; known: {known}",
        )
    if placement not in profile.placements:
        raise HwError(
            ErrorKind.INVALID_ARGUMENT,
            f"placement {placement} is not offered for {profile.name} (profile {profile_id}); "
            f"it may sit at {_placements(profile)}",
        )
    count = sum(1 for gi in instances if gi.profile_id == profile_id)
    if count >= profile.max_count:
        raise HwError(
            ErrorKind.INSUFFICIENT_RESOURCES,
            f"{profile.name} allows {profile.max_count} instance(s) and {count} exist",
        )
    for gi in instances:
        if gi.placement.overlaps(placement):
            raise HwError(
                ErrorKind.INSUFFICIENT_RESOURCES,
                f"{profile.name} at {placement} would share memory slices with GPU instance "
                f"{gi.gi_id} at {gi.placement}",
            )
    return profile


def next_gi_id(family: Family, instances: Instances) -> int:
    """The driver's GI ID for a new instance: the lowest free one in 1..(max GIs).

    Deliberately unrelated to the placement: real drivers hand out IDs that are not a function of
    it (mig-profiles.md §4), so nothing above ``hw`` may infer one from the other.
    """
    taken = {gi.gi_id for gi in instances}
    for gi_id in range(1, family.compute_slices + 1):
        if gi_id not in taken:
            return gi_id
    raise HwError(
        ErrorKind.INSUFFICIENT_RESOURCES,
        f"{family.name} holds at most {family.compute_slices} GPU instances",
    )


def create_gpu_instance(
    family: Family, instances: Instances, profile_id: int, placement: Placement
) -> tuple[Instances, GpuInstance]:
    """``nvmlDeviceCreateGpuInstanceWithPlacement``: the new instances and the new GI (no CIs)."""
    check_gpu_instance(family, instances, profile_id, placement)
    gi = GpuInstance(next_gi_id(family, instances), profile_id, placement)
    return tuple(sorted((*instances, gi), key=lambda g: g.gi_id)), gi


def destroy_gpu_instance(
    instances: Instances, gi_id: int, processes: tuple[GpuProcess, ...]
) -> Instances:
    """``nvmlGpuInstanceDestroy``: refused while CIs exist or a process holds the whole GPU."""
    gi = _find_gi(instances, gi_id)
    if gi.compute_instances:
        raise HwError(
            ErrorKind.IN_USE,
            f"GPU instance {gi_id} still has {len(gi.compute_instances)} compute instance(s)",
        )
    whole = [p.pid for p in processes if p.mig_uuid is None]
    if whole:
        raise HwError(ErrorKind.IN_USE, f"process(es) {whole} hold the whole GPU")
    return tuple(g for g in instances if g.gi_id != gi_id)


# ---- compute instances --------------------------------------------------------------------------


def ci_start(gi_slices: int, taken: Iterable[ComputeInstance], slices: int) -> int | None:
    """Where a CI of ``slices`` compute slices goes in a GI: the lowest start aligned to its size
    that overlaps no CI in ``taken``, None when none is free."""
    used = {s for ci in taken for s in range(ci.start, ci.start + ci.slices)}
    for start in range(0, gi_slices - slices + 1, slices):
        if used.isdisjoint(range(start, start + slices)):
            return start
    return None


def create_compute_instance(
    family: Family, instances: Instances, gi_id: int, ci_profile_id: int, mig_uuid: str
) -> tuple[Instances, ComputeInstance]:
    """``nvmlGpuInstanceCreateComputeInstance``: the new instances and the new CI.

    CI IDs are the lowest free from 0 within the GI, as the driver numbers them.
    """
    gi = _find_gi(instances, gi_id)
    profile = _gi_profile(family, gi.profile_id)
    if profile is None:  # decode refuses such a state; kept for a clear message regardless
        raise HwError(
            ErrorKind.UNKNOWN, f"GPU instance {gi_id} has unknown profile {gi.profile_id}"
        )
    ci_profile = _ci_profile(profile, ci_profile_id)
    if ci_profile is None:
        offered = ", ".join(f"{c.profile_id} ({c.name})" for c in profile.compute_profiles)
        kind = (
            ErrorKind.NOT_SUPPORTED
            if 0 <= ci_profile_id < CI_PROFILE_COUNT
            else ErrorKind.INVALID_ARGUMENT
        )
        raise HwError(
            kind,
            f"GPU instance {gi_id} ({profile.name}) offers no compute instance profile "
            f"{ci_profile_id}; it offers {offered}",
        )
    count = sum(1 for ci in gi.compute_instances if ci.profile_id == ci_profile_id)
    if count >= ci_profile.max_count:
        raise HwError(
            ErrorKind.INSUFFICIENT_RESOURCES,
            f"{ci_profile.name} allows {ci_profile.max_count} instance(s) per GPU instance and "
            f"GPU instance {gi_id} has {count}",
        )
    start = ci_start(profile.slices, gi.compute_instances, ci_profile.slices)
    if start is None:
        raise HwError(
            ErrorKind.INSUFFICIENT_RESOURCES,
            f"GPU instance {gi_id} ({profile.name}) has no {ci_profile.slices} free compute "
            "slice(s) left for " + ci_profile.name,
        )
    taken = {ci.ci_id for ci in gi.compute_instances}
    ci_id = next(i for i in range(len(taken) + 1) if i not in taken)
    ci = ComputeInstance(ci_id, ci_profile_id, ci_profile.slices, start, mig_uuid)
    cis = tuple(sorted((*gi.compute_instances, ci), key=lambda c: c.ci_id))
    return _with_gi(instances, replace(gi, compute_instances=cis)), ci


def destroy_compute_instance(
    instances: Instances, gi_id: int, ci_id: int, processes: tuple[GpuProcess, ...]
) -> Instances:
    """``nvmlComputeInstanceDestroy``: refused while a process runs on that MIG device (or holds
    the whole GPU, which covers every MIG device)."""
    gi = _find_gi(instances, gi_id)
    for ci in gi.compute_instances:
        if ci.ci_id == ci_id:
            break
    else:
        raise HwError(ErrorKind.NOT_FOUND, f"GPU instance {gi_id} has no compute instance {ci_id}")
    users = [p.pid for p in processes if p.mig_uuid in (None, ci.mig_uuid)]
    if users:
        raise HwError(
            ErrorKind.IN_USE,
            f"process(es) {users} use compute instance {ci_id} of GPU instance {gi_id} "
            f"({ci.mig_uuid})",
        )
    cis = tuple(c for c in gi.compute_instances if c.ci_id != ci_id)
    return _with_gi(instances, replace(gi, compute_instances=cis))


def _with_gi(instances: Instances, gi: GpuInstance) -> Instances:
    return tuple(gi if g.gi_id == gi.gi_id else g for g in instances)


# ---- whole-layout check -------------------------------------------------------------------------


def layout_problems(family: Family, instances: Instances) -> list[str]:
    """Why ``instances`` could not exist together on a GPU of ``family``; empty when they could.

    The same rules as the create calls, checked over a whole layout at once: used to refuse a
    state file that describes a layout no driver would have built, and by the tests as the
    invariant every sequence of calls keeps.
    """
    problems: list[str] = []
    ids = [gi.gi_id for gi in instances]
    if ids != sorted(set(ids)):
        problems.append(f"GPU instance IDs {ids} are not unique and ascending")
    counts: Counter[int] = Counter()
    compute = 0
    for gi in instances:
        profile = _gi_profile(family, gi.profile_id)
        if profile is None:
            problems.append(f"GPU instance {gi.gi_id}: unknown profile {gi.profile_id}")
            continue
        counts[gi.profile_id] += 1
        compute += profile.slices
        if gi.placement not in profile.placements:
            problems.append(f"GPU instance {gi.gi_id}: {profile.name} cannot sit at {gi.placement}")
        problems.extend(f"GPU instance {gi.gi_id}: {p}" for p in _ci_problems(profile, gi))
    for index, gi in enumerate(instances):
        for other in instances[index + 1 :]:
            if gi.placement.overlaps(other.placement):
                problems.append(
                    f"GPU instances {gi.gi_id} and {other.gi_id} share memory slices "
                    f"({gi.placement}, {other.placement})"
                )
    for profile in family.profiles:
        if counts[profile.profile_id] > profile.max_count:
            problems.append(
                f"{counts[profile.profile_id]} {profile.name} instances, at most "
                f"{profile.max_count} allowed"
            )
    if compute > family.compute_slices:
        problems.append(f"{compute} compute slices used, {family.compute_slices} exist")
    return problems


def _ci_problems(profile: GiProfile, gi: GpuInstance) -> list[str]:
    problems: list[str] = []
    ids = [ci.ci_id for ci in gi.compute_instances]
    if ids != sorted(set(ids)) or any(i < 0 for i in ids):
        problems.append(f"compute instance IDs {ids} are not unique, ascending and >= 0")
    counts: Counter[int] = Counter()
    used: set[int] = set()
    for ci in gi.compute_instances:
        ci_profile = _ci_profile(profile, ci.profile_id)
        if ci_profile is None:
            problems.append(
                f"compute instance {ci.ci_id}: {profile.name} has no CI profile {ci.profile_id}"
            )
            continue
        counts[ci.profile_id] += 1
        if counts[ci.profile_id] == ci_profile.max_count + 1:
            problems.append(f"more than {ci_profile.max_count} {ci_profile.name} instances")
        span = range(ci.start, ci.start + ci.slices)
        if (
            ci.slices != ci_profile.slices
            or ci.start % ci.slices
            or ci.start < 0
            or span.stop > profile.slices
        ):
            problems.append(
                f"compute instance {ci.ci_id}: {ci_profile.name} cannot sit at "
                f"{ci.start}:{ci.slices} in {profile.name}"
            )
        elif not used.isdisjoint(span):
            problems.append(f"compute instance {ci.ci_id} shares compute slices with another")
        used.update(span)
        if not MIG_UUID.fullmatch(ci.mig_uuid):
            problems.append(f"compute instance {ci.ci_id}: {ci.mig_uuid!r} is no MIG UUID")
    return problems
