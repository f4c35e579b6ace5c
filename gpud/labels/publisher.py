"""The labels publisher: keeps NFD's feature file true to the node state, and says what it did.

Each snapshot is turned into labels with the pure functions of this package (facts, gfd, node,
nfd.render) and the file is replaced only when its bytes change, so an unchanged node never
touches it. What the publisher holds back on, and why:

* Before gpud has started (``NodeState.ready``) the GPUs and their MIG layouts are partial; so
  they are during a MIG apply (devices withdrawn, instances half made). The file is left as it
  is until the node has its shape, so a restart or an apply rewrites it at most once.
* While the backend is unusable (no driver, NVML failing) gpud cannot tell what the GPUs are.
  The file stays as last written rather than losing its GPU labels: the GPUs are very likely
  still there, and pods selecting on them should not be turned away for a driver upgrade. GFD
  exits at its init error instead (``--fail-on-init-error``, its default) and so its labels
  vanish; kubelet's resources already say no GPU can be allocated meanwhile.
* ``gpud`` stopping never removes the file; ``labels.enabled: false`` does (on reload too).

A write that fails (a read-only directory, a full disk) raises, so the hub marks the publisher
degraded in ``gpudctl status`` and tries again with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpud.hw.types import GpuInfo
from gpud.labels.facts import label_inputs, read_machine_type, read_pci_classes
from gpud.labels.gfd import LabelSet
from gpud.labels.nfd import (
    FeatureFile,
    FeatureFileError,
    NfdTarget,
    Outcome,
    publish,
    record_path,
    render,
    withdraw,
)
from gpud.labels.node import node_labels
from gpud.node.hub import PublisherLink, Update
from gpud.node.state import NodeState

log = logging.getLogger(__name__)

# The backend whose GPUs are not this host's: its machine type and PCI classes are unknown.
SIMULATED_BACKEND = "sim"


@dataclass(frozen=True)
class Published:
    """What gpud publishes: the labels, the feature file holding them (None when none is
    written: labels off, no NFD directory, a write failed) and a line for ``gpudctl status``."""

    labels: Mapping[str, str] = field(default_factory=dict)
    nfd_file: Path | None = None
    detail: str = ""


def target(state: NodeState) -> NfdTarget:
    """Where the snapshot's configuration says the file goes."""
    nfd = state.config.labels.nfd
    return NfdTarget(nfd.directory, nfd.force, record_path(state.config.paths.state_dir))


def labels_for(
    state: NodeState, machine_type: str | None, pci_classes: Mapping[str, int] | None
) -> LabelSet:
    """GFD's labels for the snapshot and the operator's static ones."""
    inputs = label_inputs(
        state.system,
        state.gpus,
        {layout.gpu_index: layout.raw for layout in state.mig},
        state.mig_strategy,
        state.config.sharing,
        machine_type,
        pci_classes,
    )
    return node_labels(inputs, state.config.labels.static)


def held_back(state: NodeState) -> str:
    """Why the file must stay as it is for this snapshot; "" when it may be written."""
    if not state.ready:
        return "gpud is starting"
    if state.backend_error:
        return f"the GPUs cannot be read ({state.backend_error})"
    if state.withdrawn:
        return "a MIG layout is being applied"
    return ""


def describe(outcome: Outcome, tgt: NfdTarget, file: FeatureFile) -> str:
    """Where the labels went, or why nowhere."""
    if outcome is Outcome.NO_DIRECTORY:
        return (
            f"{len(file.labels)} labels not written: NFD's directory {tgt.directory} does not "
            "exist (no NFD on this node; labels.nfd.force writes anyway)"
        )
    return f"{len(file.labels)} labels in {tgt.path}"


def concerns(file: FeatureFile, warnings: tuple[str, ...]) -> tuple[str, ...]:
    """Every warning, label left out and note: what an operator must hear because nfd-master
    will not say it (a refused label just does not appear on the Node)."""
    rejected = tuple(f"left out {r.name}={r.value}: {r.reason}" for r in file.rejected)
    return (*warnings, *rejected, *file.notes)


def read_labels(path: Path) -> dict[str, str]:
    """The ``name=value`` lines of a feature file (comments skipped); {} when unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    pairs = (line.partition("=") for line in text.splitlines() if not line.startswith("#"))
    return {name: value for name, sep, value in pairs if sep}


class LabelsPublisher:
    """Publishes the node labels as NFD's local feature file ``features.d/gpud``.

    :attr:`published` is what ``gpudctl labels`` answers, read from the control API's thread of
    control (the event loop), replaced whole after each update.
    """

    name = "labels"

    def __init__(self) -> None:
        self.published: Published | None = None
        self._link: PublisherLink | None = None
        self._machine_type: str | None = None
        self._host_read = False
        self._pci: tuple[frozenset[str], dict[str, int]] = (frozenset(), {})
        # The concerns last logged, so that each is logged once, not at every snapshot.
        self._said: set[str] = set()

    async def start(self, link: PublisherLink) -> None:
        self._link = link

    async def publish(self, update: Update) -> None:
        state = update.state
        tgt = target(state)
        if not state.config.labels.enabled:
            if await asyncio.to_thread(withdraw, tgt) is Outcome.REMOVED:
                log.info("labels.enabled is false: removed %s", tgt.path)
            self._show(Published({}, None, "labels.enabled is false: no feature file"))
            return
        why = held_back(state)
        if why:
            await self._keep(tgt, why)
            return
        machine_type, pci_classes = await self._host_facts(state)
        computed = labels_for(state, machine_type, pci_classes)
        try:
            file = render(computed.labels)
            outcome = await asyncio.to_thread(publish, tgt, file.text)
        except FeatureFileError as exc:
            self._show(Published(computed.labels, None, f"not written: {exc}"))
            raise
        if outcome is Outcome.WRITTEN:
            log.info("node labels written to %s (%d labels)", tgt.path, len(file.labels))
        path = tgt.path if outcome is not Outcome.NO_DIRECTORY else None
        said = concerns(file, computed.warnings)
        for concern in set(said) - self._said:
            log.warning("node labels: %s", concern)
        self._said = set(said)
        self._show(Published(file.labels, path, "; ".join((describe(outcome, tgt, file), *said))))

    async def stop(self) -> None:
        """Leaves the file: labels must outlive a restart or an upgrade of gpud."""
        return None

    async def _keep(self, tgt: NfdTarget, why: str) -> None:
        """Report the file as it stands while the snapshot cannot be trusted with it."""
        previous = self.published
        if previous is None or previous.nfd_file != tgt.path:
            labels = await asyncio.to_thread(read_labels, tgt.path)
            previous = Published(labels, tgt.path if labels else None)
        kept = f"{len(previous.labels)} labels in {previous.nfd_file}" if previous.nfd_file else ""
        detail = f"{kept} kept while {why}" if kept else f"nothing written yet: {why}"
        self._show(Published(previous.labels, previous.nfd_file, detail))

    async def _host_facts(self, state: NodeState) -> tuple[str | None, dict[str, int] | None]:
        """DMI's machine type (read once) and the GPUs' PCI classes (read again only when the
        set of GPUs changes); unknown on the simulated backend, whose GPUs are not this host's."""
        if state.system.backend == SIMULATED_BACKEND:
            return None, None
        if not self._host_read:
            self._machine_type = await asyncio.to_thread(read_machine_type)
            self._host_read = True
        bus_ids = frozenset(_present(state.gpus))
        if bus_ids != self._pci[0]:
            self._pci = (bus_ids, await asyncio.to_thread(read_pci_classes, sorted(bus_ids)))
        return self._machine_type, self._pci[1]

    def _show(self, published: Published) -> None:
        self.published = published
        if self._link is not None:
            self._link.set_detail(published.detail)


def _present(gpus: tuple[GpuInfo, ...]) -> list[str]:
    return [g.pci_bus_id for g in gpus if g.pci_bus_id]
