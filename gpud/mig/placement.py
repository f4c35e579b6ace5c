"""Where GPU instances go: non-overlapping placements, keeping what already exists when it pays.

NVML refuses a GPU instance whose memory slices overlap another's, and a profile may only start
at the offsets its placement list offers (mig-profiles.md §1.2, §4). Whether a set of profiles
fits is therefore a small exact-cover question, not arithmetic: ``3g.20gb x2 + 1g.5gb`` needs 9
of 8 slices, but ``2g.10gb x3 + 1g.5gb x2`` needs exactly 8 and still does not fit, because no
``1g.5gb`` may start at slice 7.

One search answers both callers: the fit check (is there any arrangement?) and the planner (of
all arrangements, which keeps the most of what is on the GPU now?). The sizes are tiny (at most 8
memory slices, 7 instances), so a depth-first search with symmetry breaking and a bound is exact
and takes microseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpud.hw.types import GiProfile, Placement


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one requested GPU instance ends up: at a new ``placement``, or kept where it is
    (``keep`` is then the index of the existing instance, and ``placement`` its placement)."""

    placement: Placement
    keep: int | None = None


def mask(placement: Placement) -> int:
    """The memory slices a placement occupies, as a bit mask."""
    return ((1 << placement.size) - 1) << placement.start


_Option = tuple[int, int, Slot]
"""(gain, memory-slice bits, slot): plain tuples, as the search builds and reads many."""


def arrange(
    profiles: Sequence[GiProfile],
    existing: Sequence[Placement] = (),
    gains: Mapping[tuple[int, int], int] | None = None,
) -> tuple[Slot, ...] | None:
    """Give every requested GPU instance (one per entry of ``profiles``) a slot; None when the
    set cannot be placed at all.

    ``gains[(i, e)]`` says request ``i`` may be served by keeping existing instance ``e`` (at
    ``existing[e]``) and what that is worth; of all arrangements the one with the largest total
    gain is returned, ties going to the one found first (kept instances before new ones, lower
    starts first), so the answer is deterministic. A new instance never overlaps a kept one;
    existing instances that no request keeps are assumed destroyed first.
    """
    gains = gains or {}
    count = len(profiles)
    spots = range(len(existing))
    rows = [tuple([gains.get((i, e), -1) for e in spots]) for i in range(count)]
    # Most constrained first: big instances, then those with few placements. Requests that are
    # interchangeable (same profile, same gains) end up adjacent, which the symmetry rule needs.
    order = sorted(
        range(count),
        key=lambda i: (
            -profiles[i].memory_slices,
            len(profiles[i].placements),
            profiles[i].profile_id,
            rows[i],
        ),
    )
    options: list[list[_Option]] = []
    fresh: dict[int, list[_Option]] = {}  # new-placement options depend on the profile only
    for i in order:
        profile = profiles[i]
        new = fresh.get(profile.profile_id)
        if new is None:
            new = fresh[profile.profile_id] = [
                (0, mask(p), Slot(p)) for p in sorted(profile.placements)
            ]
        keep = sorted(
            (
                (gain, mask(existing[e]), Slot(existing[e], e))
                for e, gain in enumerate(rows[i])
                if gain >= 0
            ),
            key=lambda o: (-o[0], o[2].placement),
        )
        options.append(keep + new if keep else new)
    same = [
        k > 0
        and profiles[order[k]].profile_id == profiles[order[k - 1]].profile_id
        and rows[order[k]] == rows[order[k - 1]]
        for k in range(count)
    ]
    usable = 0
    for opts in options:
        for option in opts:
            usable |= option[1]
    # bound[k]: the most the requests from position k on could still gain. An existing instance
    # serves one request at most, so a run of interchangeable requests gains at most the sum of
    # its best distinct keeps; without this the search would try every way of failing to keep
    # instances that cannot be kept.
    need = [0] * (count + 1)
    bound = [0] * (count + 1)
    run = 0
    for k in range(count - 1, -1, -1):
        need[k] = need[k + 1] + profiles[order[k]].memory_slices
        run = run + 1 if k + 1 < count and same[k + 1] else 1
        best_keeps = sorted((g for g in rows[order[k]] if g >= 0), reverse=True)
        bound[k] = bound[k + 1] + (best_keeps[run - 1] if run <= len(best_keeps) else 0)

    best: list[_Option] | None = None
    best_gain = -1
    chosen: list[_Option] = []

    def search(k: int, used: int, gain: int, first: int) -> bool:
        """Depth-first over requests in ``order``; True once no better answer can exist."""
        nonlocal best, best_gain
        if k == count:
            if gain > best_gain:
                best, best_gain = list(chosen), gain
            return best_gain == bound[0]
        if gain + bound[k] <= best_gain:
            return False
        if need[k] > (usable & ~used).bit_count():
            return False
        for index in range(first, len(options[k])):
            option = options[k][index]
            bits = option[1]
            if bits & used:
                continue
            chosen.append(option)
            nxt = index + 1 if k + 1 < count and same[k + 1] else 0
            done = search(k + 1, used | bits, gain + option[0], nxt)
            chosen.pop()
            if done:
                return True
        return False

    search(0, 0, 0, 0)
    if best is None:
        return None
    slots: list[Slot] = [Slot(Placement(0, 0))] * count
    for k, option in enumerate(best):
        slots[order[k]] = option[2]
    return tuple(slots)


def total_memory_slices(profiles: Sequence[GiProfile]) -> int:
    """How many memory slices the GPU has, as its placements reveal (8 on A100/H100, 4 on A30):
    the full-GPU profile always spans them all."""
    return max((p.start + p.size for prof in profiles for p in prof.placements), default=0)
