"""Which devices a container should get, for kubelet's ``GetPreferredAllocation``.

kubelet asks while admitting a container, with the devices it could give (``available``), the
ones it has already settled on (``must_include``) and how many the container needs. It uses the
answer only as a preference: it keeps its own choice for whatever we leave out. So this function
never fails on a stale ID (the layout may have changed under kubelet); it just does not pick it.

Whole GPUs are packed for peer-to-peer bandwidth: the set that fits on one NUMA node when one can
hold the request (so the Topology Manager's CPU alignment stays possible), then the highest summed
pair score (NVLink and NVSwitch first), then the lowest indices so the answer is reproducible.

Shared devices (time-sliced replicas ``<id>::<n>``, and MIG devices, as in NVIDIA's plugin) are
spread instead: every replica of a GPU competes for the same SMs, so each pick goes to the GPU with
the fewest replicas in use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from itertools import combinations
from math import comb

from gpud.resources.topology import Topology
from gpud.resources.types import Device

# Most candidate sets searched exhaustively. C(8, 4) = 70 covers every 8-GPU box with room to
# spare; beyond the limit a greedy build-up keeps the call under a millisecond.
EXHAUSTIVE_LIMIT = 2000


def preferred_allocation(
    devices: Mapping[str, Device],
    topology: Topology,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """Up to ``size`` IDs from ``available``: ``must_include`` first, then the best additions.

    Fewer than ``size`` only when ``available`` holds too few eligible devices (known to
    ``devices``, healthy, on a GPU in ``topology``). Every ``must_include`` ID is returned as
    given, even an unknown or unhealthy one: kubelet has already assigned it. The result does not
    depend on the order of ``available``.

    Raises ValueError for requests kubelet should never send: the gRPC layer maps it to
    INVALID_ARGUMENT.
    """
    if size <= 0:
        raise ValueError(f"allocation size must be positive, got {size}")
    offered = dict.fromkeys(available)
    must = list(dict.fromkeys(must_include))
    missing = [i for i in must if i not in offered]
    if missing:
        raise ValueError(f"must-include devices not in the available set: {', '.join(missing)}")
    if len(must) > size:
        raise ValueError(
            f"{len(must)} must-include devices exceed the allocation size {size}: {', '.join(must)}"
        )
    need = size - len(must)
    if need == 0:
        return must

    forced = set(must)
    candidates: list[Device] = []
    for i in offered:
        d = devices.get(i)
        if d is not None and d.healthy and i not in forced and d.gpu_uuid in topology:
            candidates.append(d)
    if not candidates:
        return must
    known_forced = [d for i in must if (d := devices.get(i)) is not None and d.gpu_uuid in topology]

    if any(d.id != d.gpu_uuid for d in candidates):
        offered_known = [d for i in offered if (d := devices.get(i)) is not None]
        return must + _distributed(devices, topology, offered_known, known_forced, candidates, need)
    return must + _packed(topology, known_forced, candidates, need)


def _packed(
    topology: Topology, forced: Sequence[Device], candidates: Sequence[Device], need: int
) -> list[str]:
    """Whole GPUs: the best-scoring set of ``need`` candidates to add to ``forced``."""
    positions = topology.positions
    by_pos = {positions[d.gpu_uuid]: d.id for d in candidates}
    pool = sorted(by_pos)
    if len(pool) <= need:
        return [by_pos[p] for p in pool]
    fixed = [positions[d.gpu_uuid] for d in forced]
    rows = topology.scores
    base = {p: sum(rows[p][f] for f in fixed) for p in pool}

    results = [
        _search(rows, base, fixed, numa_pool, need)
        for numa_pool in _numa_pools(topology, fixed, pool, need)
    ]
    best, _ = max(results, key=_rank)
    return [by_pos[p] for p in best]


def _rank(result: tuple[tuple[int, ...], int]) -> tuple[int, tuple[int, ...]]:
    """Higher score first; among equal scores the lower index set (its negation compares higher)."""
    chosen, score = result
    return score, tuple(-p for p in chosen)


def _search(
    rows: Sequence[Sequence[int]],
    base: Mapping[int, int],
    fixed: Sequence[int],
    pool: Sequence[int],
    need: int,
) -> tuple[tuple[int, ...], int]:
    """The best ``need`` of ``pool`` with its score, exactly while that is cheap."""
    if comb(len(pool), need) <= EXHAUSTIVE_LIMIT:
        return _exhaustive(rows, base, pool, need)
    return _greedy(rows, base, fixed, pool, need)


def _numa_pools(
    topology: Topology, fixed: Sequence[int], pool: Sequence[int], need: int
) -> list[list[int]]:
    """Candidates split by NUMA node where one node can hold the whole request, else all of them.

    Keeping to one node outranks pair scores, so searching each such node on its own is both
    correct and much smaller than searching every combination.
    """
    numa = topology.numa_nodes
    fixed_nodes = {numa[f] for f in fixed}
    if len(fixed_nodes) > 1 or None in fixed_nodes:
        return [list(pool)]
    by_node: dict[int, list[int]] = {}
    for p in pool:
        node = numa[p]
        if node is not None and (not fixed_nodes or node in fixed_nodes):
            by_node.setdefault(node, []).append(p)
    fitting = [members for members in by_node.values() if len(members) >= need]
    return fitting or [list(pool)]


def _pairs(rows: Sequence[Sequence[int]], chosen: Sequence[int]) -> int:
    return sum(rows[a][b] for a, b in combinations(chosen, 2))


def _exhaustive(
    rows: Sequence[Sequence[int]], base: Mapping[int, int], pool: Sequence[int], need: int
) -> tuple[tuple[int, ...], int]:
    """Best set by score; ``combinations`` yields in index order, so the first best has the
    lowest indices."""
    best: tuple[int, ...] = ()
    best_score = -1
    for chosen in combinations(pool, need):
        score = sum(base[p] for p in chosen) + _pairs(rows, chosen)
        if score > best_score:
            best, best_score = chosen, score
    return best, best_score


def _greedy(
    rows: Sequence[Sequence[int]],
    base: Mapping[int, int],
    fixed: Sequence[int],
    pool: Sequence[int],
    need: int,
) -> tuple[tuple[int, ...], int]:
    """Grow the set one GPU at a time from ``fixed``; with nothing fixed, try every seed.

    NUMA needs no rule here: the pool is already one NUMA node's GPUs whenever one node can hold
    the request, so the greedy search chases the same objective as the exhaustive one. A lone run
    from an arbitrary first GPU can strand itself on a poorly connected one; trying each seed costs
    O(n^2 * need) integer additions, still well inside kubelet's patience.
    """
    seeds: Sequence[int | None] = [None] if fixed else pool
    runs = (_grow(rows, base, pool, need, seed) for seed in seeds)
    return max(runs, key=_rank)


def _grow(
    rows: Sequence[Sequence[int]],
    base: Mapping[int, int],
    pool: Sequence[int],
    need: int,
    seed: int | None,
) -> tuple[tuple[int, ...], int]:
    # gain[c]: what adding c adds to the set's summed score, kept current as the set grows.
    gain = {p: base[p] for p in pool}
    chosen: list[int] = []
    score = 0
    pick = seed
    while len(chosen) < need:
        if pick is None:
            pick = max(gain, key=lambda c: (gain[c], -c))
        score += gain.pop(pick)
        chosen.append(pick)
        for c in gain:
            gain[c] += rows[c][pick]
        pick = None
    return tuple(sorted(chosen)), score


def _distributed(
    devices: Mapping[str, Device],
    topology: Topology,
    offered: Sequence[Device],
    forced: Sequence[Device],
    candidates: Sequence[Device],
    need: int,
) -> list[str]:
    """Shared devices: one at a time from the GPU with the fewest replicas in use.

    "In use" counts replicas kubelet has not offered (other containers hold them), the
    must-include ones and the ones picked so far in this call, so a request spreads over idle
    GPUs. Ties go to the GPU this container has fewest of, then to the less-loaded MIG device or
    GPU behind the replica, then to the lowest index.
    """
    gpu_load: dict[str, int] = {}
    visible_load: dict[str, int] = {}
    for d in devices.values():
        gpu_load[d.gpu_uuid] = gpu_load.get(d.gpu_uuid, 0) + 1
        visible_load[d.visible_uuid] = visible_load.get(d.visible_uuid, 0) + 1
    for d in offered:
        gpu_load[d.gpu_uuid] -= 1
        visible_load[d.visible_uuid] -= 1
    picked: dict[str, int] = {}
    for d in forced:
        gpu_load[d.gpu_uuid] += 1
        visible_load[d.visible_uuid] += 1
        picked[d.gpu_uuid] = picked.get(d.gpu_uuid, 0) + 1

    queues: dict[str, deque[Device]] = {}
    for d in sorted(candidates, key=lambda d: (-1 if d.replica is None else d.replica, d.id)):
        queues.setdefault(d.visible_uuid, deque()).append(d)
    positions = topology.positions

    def load(visible: str) -> tuple[int, int, int, int, str]:
        gpu = queues[visible][0].gpu_uuid
        return (
            gpu_load[gpu],
            picked.get(gpu, 0),
            visible_load[visible],
            positions[gpu],
            visible,
        )

    chosen: list[str] = []
    while len(chosen) < need and queues:
        visible = min(queues, key=load)
        d = queues[visible].popleft()
        if not queues[visible]:
            del queues[visible]
        chosen.append(d.id)
        gpu_load[d.gpu_uuid] += 1
        visible_load[visible] += 1
        picked[d.gpu_uuid] = picked.get(d.gpu_uuid, 0) + 1
    return chosen
