"""Reading gpud's ``/metrics`` as Prometheus would: over HTTP, and line by line where the order
of labels matters (dcgm-exporter's consumers see it)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from tests.support.process import GpudProcess

_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Line:
    name: str
    # In the order written.
    labels: tuple[tuple[str, str], ...]
    value: str

    @property
    def label(self) -> dict[str, str]:
        return dict(self.labels)


def lines(text: str, name: str | None = None) -> list[Line]:
    """The sample lines of an exposition (of metric ``name`` only, when given)."""
    out = []
    for raw in text.splitlines():
        if not raw or raw.startswith("#"):
            continue
        m = _LINE.match(raw)
        assert m is not None, f"not a sample line: {raw!r}"
        labels = tuple(_LABEL.findall(m["labels"] or ""))
        if name is None or m["name"] == name:
            out.append(Line(m["name"], labels, m["value"]))
    return out


def metrics_address(gpud: GpudProcess, timeout: float = 20.0) -> str:
    """``host:port`` where this gpud serves /metrics, as ``gpudctl status`` says."""
    deadline = time.monotonic() + timeout
    while True:
        for p in gpud.status().publishers:
            if p.name == "metrics" and p.detail.startswith("serving /metrics on "):
                return p.detail.removeprefix("serving /metrics on ").split(",")[0]
        assert time.monotonic() < deadline, "gpud never said where it serves /metrics"
        time.sleep(0.1)


def get(address: str, path: str = "/metrics", timeout: float = 30.0) -> tuple[int, str, str]:
    """Status, Content-Type and body of ``GET http://address/path``."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
            body = response.read().decode()
            return response.status, response.headers.get("Content-Type", ""), body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()
