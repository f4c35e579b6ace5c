"""The labels of one node snapshot: what every label publisher (NFD's feature file, the Node
through the API server) derives from the same :class:`gpud.node.state.NodeState`."""

from __future__ import annotations

from collections.abc import Mapping

from gpud.labels.facts import label_inputs
from gpud.labels.gfd import LabelSet
from gpud.labels.node import node_labels
from gpud.node.state import NodeState


def snapshot_labels(
    state: NodeState, machine_type: str | None, pci_classes: Mapping[str, int]
) -> LabelSet:
    """GFD's labels and ``labels.static`` for ``state``; none when ``labels.enabled`` is false,
    and only the static ones while the backend is unusable (no driver: nothing to describe).

    ``machine_type`` and ``pci_classes`` are the host facts of :mod:`gpud.labels.facts`, read
    by the caller (they do not change while gpud runs, so a publisher reads them once).
    """
    labels = state.config.labels
    if not labels.enabled:
        return LabelSet({})
    if state.backend_error:
        return node_labels(None, labels.static)
    inputs = label_inputs(
        state.system,
        state.gpus,
        {m.gpu_index: m.raw for m in state.mig},
        state.mig_strategy,
        state.config.sharing,
        machine_type=machine_type,
        pci_classes=pci_classes,
    )
    return node_labels(inputs, labels.static)
