"""The Events gpud has decided to send and not yet sent: bounded, in order, each with its name.

Each Event gets its name when it enters the outbox (the Node's name and a nanosecond stamp, as
kubelet names its own), so a retry after an answer that was lost sends the same name and the API
server refuses a second copy (409 AlreadyExists, taken as sent). An API server that is away keeps
the Events here until it is back; beyond :data:`MAX_OUTBOX` the oldest go, counted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gpud.kube.report import Report, clip

MAX_OUTBOX = 200
NAMESPACE = "default"  # where kubelet puts its Node's Events: a Node has no namespace
COMPONENT = "gpud"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An Event to send; it stands for ``count`` occurrences, the first at ``first_at``."""

    name: str
    report: Report
    count: int = 1
    first_at: float = 0.0


class Outbox:
    def __init__(self, node_name: str, limit: int = MAX_OUTBOX) -> None:
        self.node_name = node_name
        self.limit = limit
        self._items: deque[Outgoing] = deque()
        self._last_ns = 0
        self.dropped = 0

    def add(self, report: Report, held_back: int = 0, first_at: float = 0.0) -> bool:
        """Queue ``report`` (which stands for ``held_back`` more before it, the first at
        ``first_at``); False when that pushed the oldest out."""
        stamp = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = stamp
        name = f"{self.node_name}.{stamp:x}"
        self._items.append(Outgoing(name, report, 1 + held_back, first_at or report.at))
        if len(self._items) > self.limit:
            self._items.popleft()
            self.dropped += 1
            return False
        return True

    def first(self) -> Outgoing | None:
        return self._items[0] if self._items else None

    def done(self) -> None:
        self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def event_body(outgoing: Outgoing, node_name: str, node_uid: str) -> dict[str, Any]:
    """The core/v1 Event about gpud's Node, as kubelet writes its own node Events."""
    report = outgoing.report
    message = report.message
    if outgoing.count > 1:
        message += (
            f" ({outgoing.count - 1} more like this since {_stamp(outgoing.first_at)} were held "
            "back by gpud's Event rate limit)"
        )
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": outgoing.name, "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid},
        "type": report.type,
        "reason": report.reason,
        "message": clip(message),
        "source": {"component": COMPONENT, "host": node_name},
        "reportingComponent": COMPONENT,
        "reportingInstance": node_name,
        "firstTimestamp": _stamp(outgoing.first_at),
        "lastTimestamp": _stamp(report.at),
        "count": outgoing.count,
    }
