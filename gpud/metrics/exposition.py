"""Prometheus' text format (0.0.4), written the way dcgm-exporter writes it.

prometheus_client's own writer would change what dashboards and alerts match on: it sorts every
sample's labels and names a counter's family ``<name>_total``, while dcgm-exporter writes its
labels in template order (``gpu, UUID, pci_bus_id, device, modelName, ...``) and keeps counters
such as ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` as they are. So the families are
prometheus_client's, and this writes them keeping each sample's name and label order. Integers
print as integers and other values with six decimals, as dcgm-exporter's ``%d``/``%f``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(families: Iterable[Metric]) -> bytes:
    """The exposition of ``families`` (counters and gauges); a family without samples is left
    out, as dcgm-exporter leaves out a field no GPU has."""
    out: list[str] = []
    # The same label sets recur in every family (one per GPU row): write each once.
    written: dict[tuple[tuple[str, str], ...], str] = {}
    for family in families:
        if not family.samples:
            continue
        kind = family.type
        if kind not in ("counter", "gauge"):
            raise ValueError(f"{family.name}: cannot write a {kind} family")
        name = family.samples[0].name
        out.append(f"# HELP {name} {_help(family.documentation)}\n# TYPE {name} {kind}\n")
        for sample in family.samples:
            key = tuple(sample.labels.items())
            body = written.get(key)
            if body is None:
                labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in key)
                body = written[key] = f"{{{labels}}}" if labels else ""
            out.append(f"{sample.name}{body} {_value(sample.value)}\n")
    return "".join(out).encode()


def _value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return floatToGoString(value)
    return f"{value:f}"


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _label_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
