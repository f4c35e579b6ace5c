"""The labels gpud publishes for its node: GPU Feature Discovery's, then the operator's own."""

from __future__ import annotations

from collections.abc import Mapping

from gpud.labels.gfd import LabelInputs, LabelSet, gfd_labels


def node_labels(inputs: LabelInputs | None, static: Mapping[str, str]) -> LabelSet:
    """GFD's labels for ``inputs`` (none while gpud has no GPUs to read: ``None``, no driver) and
    ``static`` (gpud.yaml's ``labels.static``).

    The two never share a name: the configuration refuses a static label GFD's set could hold
    (gpud.labels.names.computed_by_gpud), so neither source silently overrides the other.
    """
    computed = gfd_labels(inputs) if inputs is not None else LabelSet({})
    return LabelSet({**computed.labels, **static}, computed.warnings)
