"""How close each pair of physical GPUs is, computed once per device layout.

``GetPreferredAllocation`` sits on kubelet's admission path and is called for every container that
asks for more than one device. NVIDIA's plugin rebuilds its topology (and asks NVML) on every call;
gpud derives it once from the :class:`~gpud.hw.types.GpuInfo` snapshot it already holds and keeps
only integers, so a call is table look-ups.

Scores follow NVIDIA's go-gpuallocator where the facts exist in ``GpuInfo``: an NVLink pair gets 100
per link (NVSwitch-connected pairs included, as NVML reports those links too), which outweighs any
PCIe path; then a shared PCIe switch (50), the same NUMA node (20), anything else (10).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from gpud.hw.types import GpuInfo

NVLINK_SCORE_PER_LINK = 100
SAME_PCIE_SWITCH_SCORE = 50
SAME_NUMA_SCORE = 20
CROSS_NUMA_SCORE = 10


def pair_score(a: GpuInfo, b: GpuInfo) -> int:
    """Affinity of two distinct GPUs; higher means faster peer-to-peer traffic.

    Links are read from both ends because a backend may list a peer on one side only; the larger
    count wins so the score is symmetric.
    """
    links = max(a.nvlinks_to(b.uuid), b.nvlinks_to(a.uuid))
    if links:
        return NVLINK_SCORE_PER_LINK * links
    if a.pcie_switch is not None and a.pcie_switch == b.pcie_switch:
        return SAME_PCIE_SWITCH_SCORE
    if a.numa_node is not None and a.numa_node == b.numa_node:
        return SAME_NUMA_SCORE
    return CROSS_NUMA_SCORE


@dataclass(frozen=True, slots=True)
class Topology:
    """Pairwise scores, NUMA nodes and indices of the physical GPUs, by position.

    Build it with :meth:`from_gpus`. Positions follow GPU index order, so "lowest index first"
    tie-breaks are "lowest position first" and the hot path compares plain ints. The tables are
    tuples: a Topology is shared by concurrent RPCs and must never change under them.
    """

    uuids: tuple[str, ...]
    indices: tuple[int, ...]
    numa_nodes: tuple[int | None, ...]
    # scores[i][j] for positions i != j; the diagonal is 0 (a GPU is not its own peer).
    scores: tuple[tuple[int, ...], ...]
    # uuid -> position; derived from ``uuids``, so it takes no part in equality or hashing.
    positions: Mapping[str, int] = field(compare=False, repr=False)

    @classmethod
    def from_gpus(cls, gpus: Sequence[GpuInfo]) -> Topology:
        ordered = sorted(gpus, key=lambda g: g.index)
        return cls(
            uuids=tuple(g.uuid for g in ordered),
            indices=tuple(g.index for g in ordered),
            numa_nodes=tuple(g.numa_node for g in ordered),
            scores=tuple(
                tuple(0 if a is b else pair_score(a, b) for b in ordered) for a in ordered
            ),
            positions=MappingProxyType({g.uuid: pos for pos, g in enumerate(ordered)}),
        )

    def __len__(self) -> int:
        return len(self.uuids)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.positions

    def score(self, a: str, b: str) -> int:
        """Affinity of two GPUs by UUID (0 for a GPU with itself); KeyError for an unknown one."""
        return self.scores[self.positions[a]][self.positions[b]]

    def numa_node(self, uuid: str) -> int | None:
        return self.numa_nodes[self.positions[uuid]]

    def index(self, uuid: str) -> int:
        return self.indices[self.positions[uuid]]
