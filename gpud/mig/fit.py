"""Does a layout fit a GPU? Device names resolved to profiles, with the reason when not.

A layout names devices the way people write them ("3g.20gb", "1c.2g.10gb", "1g.5gb+me"); NVML
creates GPU instances (GIs) from GI profiles and compute instances (CIs) inside them from CI
profiles. :func:`resolve` maps one onto the other using the profiles *this* GPU reports (names
drift between boards and drivers, mig-profiles.md §1.4), groups partial CIs into GIs, and proves
with one concrete arrangement that the whole set can be placed. When it cannot, the answer says
which GPU and why in terms an operator can act on, rather than NVML's bare
INSUFFICIENT_RESOURCES that mig-parted reports only after it has torn the GPU down.

Pure: a :class:`MigLayoutState` in, a value out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpud.hw.types import CiProfile, GiProfile, MigLayoutState, Placement
from gpud.mig.catalog import families, family_for
from gpud.mig.layout import GpuTarget, parse_profile
from gpud.mig.placement import arrange, total_memory_slices

TIMES = "\u00d7"
"""The multiplication sign in "3g.20gb \u00d72": messages are read by people."""

Device = tuple[int, int]
"""A MIG device as the planner compares them: (GI profile ID, CI profile ID)."""


@dataclass(frozen=True, slots=True)
class GiRequest:
    """One GPU instance a target wants, with the compute instances to create in it (largest
    first, the order that lets each CI find an aligned start; see :func:`ci_starts`)."""

    profile: GiProfile
    cis: tuple[CiProfile, ...]

    @property
    def ci_ids(self) -> tuple[int, ...]:
        return tuple(ci.profile_id for ci in self.cis)

    def describe(self) -> str:
        names = Counter(ci.name for ci in self.cis)
        if list(names) == [self.profile.name]:
            return self.profile.name
        inner = ", ".join(_times(name, n) for name, n in names.items())
        return f"{self.profile.name} [{inner}]"


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """A target in NVML's terms for GPU ``index``.

    ``gis`` is the canonical grouping (partial CIs packed into as few GIs as hold them) and
    ``placements`` one arrangement that fits, in the same order: proof, not a prescription; the
    planner chooses placements that keep what exists.
    """

    index: int
    enabled: bool
    gis: tuple[GiRequest, ...] = ()
    placements: tuple[Placement, ...] = ()

    @property
    def devices(self) -> tuple[tuple[Device, int], ...]:
        """The wanted devices as a sorted multiset, comparable with :func:`devices_of`."""
        counts: Counter[Device] = Counter(
            (gi.profile.profile_id, ci.profile_id) for gi in self.gis for ci in gi.cis
        )
        return tuple(sorted(counts.items()))


@dataclass  # not frozen: Python sets __traceback__ on exceptions it raises
class FitError(Exception):
    """Target ``index`` cannot be built on this GPU; ``reasons`` says why, one line each.

    ``mig_unsupported`` marks the one reason a caller may choose to skip rather than fail on:
    mig-parted leaves GPUs without MIG alone when a layout says ``devices: all``.
    """

    index: int
    uuid: str
    product: str
    reasons: tuple[str, ...]
    mig_unsupported: bool = False

    def __str__(self) -> str:
        return f"GPU {self.index} ({self.uuid}, {self.product}): " + "; ".join(self.reasons)


def devices_of(state: MigLayoutState) -> tuple[tuple[Device, int], ...]:
    """The GPU's current devices as a sorted multiset of (GI profile ID, CI profile ID)."""
    counts: Counter[Device] = Counter(
        (gi.profile_id, ci.profile_id) for gi in state.instances for ci in gi.compute_instances
    )
    return tuple(sorted(counts.items()))


def product(pci_device_id: int) -> str:
    """A board's family and PCI ID for messages ("A100-40GB, PCI 0x20B010DE")."""
    family = family_for(pci_device_id)
    pci = f"PCI 0x{pci_device_id:08X}"
    return f"{family.name}, {pci}" if family else pci


# ---- compute instances inside one GPU instance --------------------------------------------------


def ci_starts(
    gi: GiProfile, cis: Sequence[CiProfile], taken: Iterable[tuple[int, int]] = ()
) -> tuple[int, ...] | None:
    """Where CIs created in this order would start (compute slices within the GI), next to the
    (start, size) spans in ``taken``; None when one finds no room or a profile's count is passed.

    The rule, as the simulated backend applies it: a CI starts at a multiple of its own size and
    takes the lowest such start that is free. NVML publishes no CI placement table
    (mig-profiles.md §3), so this is the model the planner and the dry-run share. It makes order
    matter (a 1c created before a 2c in a 3g GI leaves the 2c nowhere), which is why requests list
    CIs largest first.
    """
    used = 0
    for start, size in taken:
        used |= ((1 << size) - 1) << start
    counts: Counter[int] = Counter()
    limits = {ci.profile_id: ci.max_count for ci in gi.compute_profiles}
    starts: list[int] = []
    for ci in cis:
        counts[ci.profile_id] += 1
        if counts[ci.profile_id] > limits.get(ci.profile_id, 0):
            return None
        bits = (1 << ci.slices) - 1
        for start in range(0, gi.slices - ci.slices + 1, ci.slices):
            if not used & (bits << start):
                used |= bits << start
                starts.append(start)
                break
        else:
            return None
    return tuple(starts)


def largest_first(cis: Iterable[CiProfile]) -> tuple[CiProfile, ...]:
    return tuple(sorted(cis, key=lambda c: (-c.slices, c.profile_id)))


def pack_cis(gi: GiProfile, cis: Sequence[CiProfile]) -> tuple[tuple[CiProfile, ...], ...]:
    """Partial CIs of one GI profile grouped into as few GIs as hold them.

    Exact (a small search, not first-fit): a layout asking for ``1c.3g.20gb x3`` gets one GI,
    not three, and the fit check is only as good as this grouping is tight. Deterministic.
    """
    items = largest_first(cis)
    if not items:
        return ()
    per_gi = Counter(ci.profile_id for ci in items)
    limits = {ci.profile_id: max(ci.max_count, 1) for ci in gi.compute_profiles}
    lower = max(
        -(-sum(ci.slices for ci in items) // gi.slices),
        *(-(-n // limits.get(pid, 1)) for pid, n in per_gi.items()),
    )
    for bins in range(lower, len(items) + 1):
        groups: list[list[CiProfile]] = [[] for _ in range(bins)]
        if _fill(gi, items, 0, groups):
            packed = (tuple(g) for g in groups if g)
            return tuple(sorted(packed, key=lambda g: [c.profile_id for c in g]))
    raise AssertionError("one CI per GI always fits")  # pragma: no cover


def _fill(
    gi: GiProfile, items: tuple[CiProfile, ...], k: int, groups: list[list[CiProfile]]
) -> bool:
    if k == len(items):
        return True
    tried: set[tuple[int, ...]] = set()
    for group in groups:
        key = tuple(ci.profile_id for ci in group)
        if key in tried:  # an identical group was tried already: same outcome
            continue
        tried.add(key)
        group.append(items[k])
        if ci_starts(gi, group) is not None and _fill(gi, items, k + 1, groups):
            return True
        group.pop()
    return False


# ---- resolve ------------------------------------------------------------------------------------


def _times(name: str, count: int) -> str:
    return name if count == 1 else f"{name} {TIMES}{count}"


def _starts(profile: GiProfile) -> str:
    starts = sorted(p.start for p in profile.placements)
    if len(starts) > 2 and starts == list(range(starts[0], starts[-1] + 1)):
        return f"{starts[0]}-{starts[-1]}"
    return ",".join(str(s) for s in starts)


def _unknown_profile(name: str, state: MigLayoutState) -> str:
    offered = ", ".join(p.name for p in state.profiles)
    own = family_for(state.pci_device_id)
    elsewhere = [
        fam.name for fam in families().values() if fam is not own and fam.profile(name) is not None
    ]
    hint = f"; {name} is a profile of {', '.join(elsewhere)}" if elsewhere else ""
    return f"{name}: not a profile of this GPU, which offers {offered}{hint}"


def _find_ci(gi: GiProfile, compute: int) -> CiProfile | None:
    name = f"{compute}c.{gi.name}"
    for ci in gi.compute_profiles:
        if ci.name == name:
            return ci
    candidates = [ci for ci in gi.compute_profiles if ci.slices == compute]
    return min(candidates, key=lambda c: c.profile_id) if candidates else None


def resolve(target: GpuTarget, state: MigLayoutState) -> ResolvedTarget | FitError:
    """``target`` in NVML's terms for this GPU, or why it cannot be built here.

    The error is returned, not raised, so a caller checking a whole node collects every GPU's
    answer before deciding anything. Checks, in order: MIG support; every name is a profile of
    this GPU (and a CI that its GI offers); per-profile instance counts; memory-slice placement
    of the whole set.
    """

    def fail(*reasons: str, unsupported: bool = False) -> FitError:
        return FitError(
            state.index, state.uuid, product(state.pci_device_id), tuple(reasons), unsupported
        )

    if not target.enabled:
        return ResolvedTarget(state.index, False)
    if not state.mode.capable:
        return fail("MIG is not supported on this GPU", unsupported=True)
    if not state.profiles:
        return fail("the GPU reports no MIG profiles, so no layout can be checked")
    by_name = {p.name: p for p in state.profiles}
    reasons: list[str] = []
    full: Counter[int] = Counter()
    partial: dict[int, list[CiProfile]] = {}
    names: dict[int, Counter[str]] = {}
    for name, count in target.devices:
        if count < 0:
            reasons.append(f"{name}: count must be >= 0 (got {count})")
            continue
        if count == 0:
            continue
        try:
            parsed = parse_profile(name)
        except ValueError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        gi = by_name.get(parsed.gi_name)
        if gi is None:
            reasons.append(_unknown_profile(parsed.gi_name, state))
            continue
        names.setdefault(gi.profile_id, Counter())[name] += count
        if not parsed.partial:
            if gi.full_ci is None:
                reasons.append(f"{name}: the GPU reports no compute instance spanning {gi.name}")
            full[gi.profile_id] += count
            continue
        assert parsed.compute is not None
        ci = _find_ci(gi, parsed.compute)
        if ci is None:
            offered = ", ".join(c.name for c in gi.compute_profiles)
            reasons.append(f"{name}: a {gi.name} GPU instance offers {offered}, not {name}")
            continue
        partial.setdefault(gi.profile_id, []).extend([ci] * count)
    if reasons:
        return fail(*reasons)

    requests: list[GiRequest] = []
    for gi in state.profiles:
        if gi.profile_id not in names:
            continue
        full_ci = gi.full_ci
        groups = [(full_ci,)] * full[gi.profile_id] if full_ci else []
        packed = pack_cis(gi, partial.get(gi.profile_id, ()))
        groups += packed
        if len(groups) > gi.max_count:
            reasons.append(_too_many(gi, names[gi.profile_id], len(groups), bool(packed)))
        requests.extend(GiRequest(gi, largest_first(g)) for g in groups)
    if reasons:
        return fail(*reasons)

    requests.sort(key=request_key)
    slots = arrange([r.profile for r in requests])
    if slots is None:
        return fail(_no_room(requests, state))
    return ResolvedTarget(state.index, True, tuple(requests), tuple(s.placement for s in slots))


def request_key(r: GiRequest) -> tuple[int, int, int, tuple[int, ...]]:
    """The canonical order of requests: big GIs first, then by profile and CIs."""
    return (-r.profile.memory_slices, -r.profile.slices, r.profile.profile_id, r.ci_ids)


def _too_many(gi: GiProfile, names: Counter[str], gis: int, packed: bool) -> str:
    asked = " + ".join(_times(n, c) for n, c in sorted(names.items()))
    limit = f"this GPU holds at most {gi.max_count} GPU instance{'s' if gi.max_count > 1 else ''}"
    if not packed:
        return f"{asked}: {limit} of {gi.name}"
    return f"{asked} need {gis} GPU instances of {gi.name}; {limit} of it"


def _no_room(requests: Sequence[GiRequest], state: MigLayoutState) -> str:
    profiles = {r.profile.name: r.profile for r in requests}
    counts = Counter(r.profile.name for r in requests)
    order = sorted(profiles.values(), key=lambda p: (-p.memory_slices, p.name))
    asked = " + ".join(_times(p.name, counts[p.name]) for p in order)
    need = sum(r.profile.memory_slices for r in requests)
    total = total_memory_slices(state.profiles)
    verb = "needs" if len(requests) == 1 else "need"
    if need > total:
        return f"{asked} {verb} {need} of {total} memory slices"
    starts = "; ".join(f"{p.name} at {_starts(p)}" for p in order)
    return (
        f"{asked} {verb} {need} of {total} memory slices, but their placements do not combine "
        f"without overlap (allowed starts: {starts})"
    )
