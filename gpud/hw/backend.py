"""The protocol both hardware backends implement.

Kept to what the layers above need, so a simulated machine can stand in for a real one everywhere
above ``hw``. Calls are synchronous and cheap (NVML answers from the driver in microseconds);
events are delivered through a sink that may be called from any thread, because NVML's event wait
blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from gpud.hw.types import GpuInfo, HwEvent, SystemInfo

EventSink = Callable[[HwEvent], None]


@runtime_checkable
class Backend(Protocol):
    """A source of GPU facts and events.

    ``open`` raises :class:`gpud.hw.errors.BackendUnavailable` when the backend cannot work at
    all (no driver); other calls raise :class:`gpud.hw.errors.HwError`.
    """

    name: str

    def open(self) -> None: ...

    def close(self) -> None: ...

    def system(self) -> SystemInfo: ...

    def gpus(self) -> list[GpuInfo]:
        """All GPUs, ordered by index. A lost GPU is still listed (health is tracked above)."""
        ...

    def start_events(self, sink: EventSink) -> None:
        """Begin delivering XID and GPU-lost events to ``sink`` until ``close``."""
        ...


@runtime_checkable
class FaultInjector(Protocol):
    """Only the simulated backend injects faults; the control API refuses on any other."""

    def inject_xid(self, index: int, xid: int) -> HwEvent: ...

    def inject_gpu_lost(self, index: int) -> HwEvent: ...
