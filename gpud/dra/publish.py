"""This node's ResourceSlices kept equal to what gpud computes, with the kubelet's credentials.

The API link (:mod:`gpud.kube.publisher`) drives it: :meth:`SliceSync.keep` with each snapshot
while ``allocation.mode`` is ``dra``, :meth:`SliceSync.withdraw` when it is not. ``keep`` lists
the node's slices only when it does not know what the API server holds, plans
(:func:`gpud.dra.slices.plan`) and sends only what differs: an unchanged node sends nothing,
a MIG apply is re-published as soon as its snapshot arrives, with a new pool generation.

A watch on the node's slices (the field-selector watch a kubelet credential may open) notices
what others do to them: kubelet deleting every slice of the node when it starts, an operator
deleting one, a slice written by an older gpud. Any change that is not gpud's own write makes
the next ``keep`` read the server again and repair it; a watch that breaks (the API server
restarting) is opened again with backoff and counts as such a change, so what happened while it
was away is repaired too. A failed write raises to the API link, which shows it in ``gpudctl
status`` and retries with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.dra.devices import DraDevice, dra_devices, pci_bus_id
from gpud.dra.slices import DIGEST_ANNOTATION, Held, plan, slice_specs
from gpud.kube.client import KubeClient, KubeError
from gpud.node.hub import Backoff
from gpud.node.state import NodeState

log = logging.getLogger(__name__)

BACKOFF = Backoff(first=1.0, cap=30.0)
NOT_SERVED = (
    "the API server does not serve resource.k8s.io/v1 ResourceSlices: allocation.mode dra "
    "needs Kubernetes 1.34 or later with DRA enabled"
)


def read_pcie_roots(bus_ids: Iterable[str], sys_root: Path = Path("/sys")) -> dict[str, str]:
    """Each PCI device's root complex (``pci0000:00``), the first ``pci*`` directory on its
    sysfs path; devices sysfs does not show are left out."""
    roots = {}
    for bus_id in bus_ids:
        try:
            path = (sys_root / "bus" / "pci" / "devices" / bus_id).resolve(strict=True)
        except OSError:
            continue
        root = next((p for p in path.parts if p.startswith("pci")), None)
        if root is not None:
            roots[bus_id] = root
    return roots


@dataclass(frozen=True, slots=True)
class Published:
    """What ``gpudctl status`` says: the pool as last written or found unchanged."""

    devices: int = 0
    slices: int = 0
    generation: int = 0
    tainted: int = 0

    def describe(self, driver: str) -> str:
        if not self.slices:
            return f"DRA: no ResourceSlices ({driver}): no devices to offer"
        text = (
            f"DRA: {self.devices} devices in {self.slices} ResourceSlice"
            f"{'s' if self.slices != 1 else ''} ({driver}, pool generation {self.generation})"
        )
        return text + (f", {self.tainted} tainted unhealthy" if self.tainted else "")


def _held(item: Any) -> Held:
    meta, spec = item.metadata, item.spec
    digest = (meta.annotations or {}).get(DIGEST_ANNOTATION, "")
    return Held(str(meta.name), int(spec.pool.generation), digest)


class SliceSync:
    """One node's pool of one driver; :meth:`start` the watch, :meth:`stop` it."""

    def __init__(
        self, client: KubeClient, driver: str, changed: Callable[[], None], sys_root: Path
    ) -> None:
        self.client = client
        self.driver = driver
        self.node = client.access.node_name
        # Called when the server's slices changed under gpud: hand keep() the snapshot again.
        self.changed = changed
        self.sys_root = sys_root
        self.published = Published()
        self.problem = ""
        # What the API server holds, by name; None when gpud must read it again.
        self._held: dict[str, Held] | None = None
        # gpud's own writes the watch will echo: name -> resourceVersion ("" when deleted).
        self._mine: dict[str, str] = {}
        # The last pool generation written (a pool emptied and refilled goes on from it).
        self._generation = 0
        self._roots: tuple[tuple[str, ...], dict[str, str]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._watch(), name="resourceslice watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def devices(self, state: NodeState) -> tuple[DraDevice, ...]:
        bus_ids = tuple(sorted(pci_bus_id(g.pci_bus_id) for g in state.gpus))
        if self._roots is None or self._roots[0] != bus_ids:
            self._roots = (bus_ids, read_pcie_roots(bus_ids, self.sys_root))
        return dra_devices(state, self.driver, self._roots[1])

    async def keep(self, state: NodeState) -> None:
        """Make the API server hold this snapshot's devices."""
        devices = self.devices(state)
        specs = slice_specs(devices, self.driver, self.node)
        try:
            await self._send(specs)
        except KubeError:
            self._held = None  # partly written, or the server changed: read it again
            raise
        generation = max((h.generation for h in (self._held or {}).values()), default=0)
        tainted = sum(1 for d in devices if d.taints)
        self.published = Published(len(devices), len(specs), generation, tainted)

    async def withdraw(self) -> None:
        """Delete every slice of this node's pool (the node no longer offers its GPUs via DRA)."""
        self._held = None
        await self._send([])
        self.published = Published()

    async def _send(self, specs: list[dict[str, Any]]) -> None:
        """Write what differs from what the API server holds."""
        if self._held is None:
            try:
                items, _ = await self.client.list_slices(self.driver)
            except KubeError as exc:
                if exc.code != 404:
                    raise
                if specs:
                    raise KubeError(NOT_SERVED, 404) from None
                items = []  # nothing to delete on a cluster without DRA
            self._held = {h.name: h for h in map(_held, items)}
            self._mine = {k: v for k, v in self._mine.items() if k in self._held}
        held = self._held
        todo = plan(specs, list(held.values()), self.driver, self.node, self._generation)
        if not todo.writes:
            return
        self._generation = todo.generation
        for name in todo.deletes:
            self._mine[name] = ""
            await self.client.delete_slice(name)
            del held[name]
        for name, body in todo.updates:
            self._record(await self.client.patch_slice(name, body))
        for body in todo.creates:
            self._record(await self.client.create_slice(body))
        log.info(
            "ResourceSlices of %s (%s): %d devices in %d slices, pool generation %d "
            "(%d deleted, %d updated, %d created)",
            self.node,
            self.driver,
            sum(len(s["devices"]) for s in specs),
            len(specs),
            todo.generation,
            len(todo.deletes),
            len(todo.updates),
            len(todo.creates),
        )

    def _record(self, written: Any) -> None:
        held = _held(written)
        self._mine[held.name] = str(written.metadata.resourceVersion or "")
        if self._held is not None:
            self._held[held.name] = held

    # ---- the watch -----------------------------------------------------------------------

    async def _watch(self) -> None:
        failures = 0
        while True:
            try:
                _, since = await self.client.list_slices(self.driver)
                if failures:
                    self._foreign("the watch was away")
                failures = 0
                self._report("")
                async for kind, name, version in self.client.watch_slices(self.driver, since):
                    if self._mine.get(name) == (version if kind != "DELETED" else ""):
                        continue
                    if kind == "DELETED" and name not in (self._held or {}):
                        continue
                    self._foreign(f"{name} {kind.lower()} by someone else")
            except KubeError as exc:
                failures += 1
                delay = BACKOFF.delay(failures)
                self._report(f"watching ResourceSlices: {exc}; again in {delay:.0f} s")
                log.warning("watching the ResourceSlices of %s: %s", self.node, exc)
                await asyncio.sleep(delay)
                continue
            await asyncio.sleep(BACKOFF.first)  # the server ended the watch: read again

    def _foreign(self, what: str) -> None:
        log.info("ResourceSlices of %s changed (%s): checking them", self.node, what)
        self._held = None
        self.changed()

    def _report(self, problem: str) -> None:
        if problem != self.problem:
            self.problem = problem
            self.changed()
