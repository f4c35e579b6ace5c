"""gpud's own counters: what it did since it started, for the ``gpud_*`` metrics.

Counting must cost kubelet's hot path nothing measurable, so these are plain integers that the
daemon and the plugin servers bump in place (all on the event loop's thread), never a published
snapshot per call. A publisher reads them when it needs them with :meth:`NodeStats.read`, which
copies them into frozen values and is safe from any thread (the copies are single C-level dict
copies under the GIL, and the counters are ints). Counters only grow, as Prometheus expects;
a resource that goes away keeps its counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class ResourceCounters:
    """One resource's counts, held by its plugin server so a call bumps an attribute."""

    __slots__ = ("allocate_calls", "allocate_errors", "registrations", "reregistrations")

    def __init__(self) -> None:
        # Allocate RPCs, and those answered with an error (unknown or unhealthy IDs, too many).
        self.allocate_calls = 0
        self.allocate_errors = 0
        # Successful registrations with kubelet; reregistrations are those after the first.
        self.registrations = 0
        self.reregistrations = 0


@dataclass(frozen=True, slots=True)
class ResourceCounts:
    allocate_calls: int
    allocate_errors: int
    registrations: int
    reregistrations: int


@dataclass(frozen=True, slots=True)
class MigApplyCounts:
    """Applies with one result: how many, their summed wall time and NVML mutations."""

    count: int = 0
    seconds: float = 0.0
    mutations: int = 0


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A copy of the counters at one moment.

    ``xids`` maps (GPU UUID, XID) to how many were seen (critical or not). ``mig_applies`` is by
    result: applied, unchanged, planned (dry run), failed (a step failed), refused (in use, or
    a strategy that cannot advertise it), invalid (the layout is wrong or does not fit).
    ``config_reloads`` is by result: ok, failed.
    """

    resources: Mapping[str, ResourceCounts]
    xids: Mapping[tuple[str, int], int]
    mig_applies: Mapping[str, MigApplyCounts]
    config_reloads: Mapping[str, int]


class NodeStats:
    def __init__(self) -> None:
        self._resources: dict[str, ResourceCounters] = {}
        self._xids: dict[tuple[str, int], int] = {}
        self._mig: dict[str, MigApplyCounts] = {}
        self._reloads: dict[str, int] = {}

    def resource(self, name: str) -> ResourceCounters:
        """The counters of resource ``name``, made on first use and kept for good."""
        counters = self._resources.get(name)
        if counters is None:
            counters = self._resources[name] = ResourceCounters()
        return counters

    def xid_seen(self, gpu_uuid: str, xid: int) -> None:
        key = (gpu_uuid, xid)
        self._xids[key] = self._xids.get(key, 0) + 1

    def mig_applied(self, result: str, seconds: float, mutations: int) -> None:
        was = self._mig.get(result, MigApplyCounts())
        self._mig[result] = MigApplyCounts(
            was.count + 1, was.seconds + seconds, was.mutations + mutations
        )

    def config_reloaded(self, ok: bool) -> None:
        key = "ok" if ok else "failed"
        self._reloads[key] = self._reloads.get(key, 0) + 1

    def read(self) -> StatsSnapshot:
        resources = {
            name: ResourceCounts(
                c.allocate_calls, c.allocate_errors, c.registrations, c.reregistrations
            )
            for name, c in self._resources.copy().items()
        }
        return StatsSnapshot(
            resources=MappingProxyType(resources),
            xids=MappingProxyType(self._xids.copy()),
            mig_applies=MappingProxyType(self._mig.copy()),
            config_reloads=MappingProxyType(self._reloads.copy()),
        )
