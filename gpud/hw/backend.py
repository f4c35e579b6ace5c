"""The protocol both hardware backends implement.

Kept to what the layers above need, so a simulated machine can stand in for a real one everywhere
above ``hw``. Calls are synchronous and cheap (NVML answers from the driver in microseconds);
events are delivered through a sink that may be called from any thread, because NVML's event wait
blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from gpud.hw.telemetry import GpuReading
from gpud.hw.types import (
    NO_INSTANCE,
    ComputeInstance,
    GpuInfo,
    GpuInstance,
    GpuProcess,
    HwEvent,
    MigLayoutState,
    MigState,
    Placement,
    SystemInfo,
)

EventSink = Callable[[HwEvent], None]


@dataclass(frozen=True)
class DriverSignals:
    """How a backend's driver makes itself known once it loads, for a daemon started before it.

    The kernel announces the module with uevents (``add`` of ``/module/<module>``, its PCI driver,
    each bound GPU); the control node ``<dev_dir>/<control_node>`` appears when udev's rules or
    ``nvidia-modprobe`` create it. Watching both costs nothing while nothing happens.
    """

    module: str
    dev_dir: Path
    control_node: str

    @property
    def control_path(self) -> Path:
        return self.dev_dir / self.control_node


@runtime_checkable
class Backend(Protocol):
    """A source of GPU facts and events.

    ``open`` raises :class:`gpud.hw.errors.BackendUnavailable` when the backend cannot work at
    all (no driver); other calls raise :class:`gpud.hw.errors.HwError`.
    """

    name: str
    driver: DriverSignals

    def open(self) -> None:
        """Start using the driver; may be called again after it raised (the driver came later)."""
        ...

    def close(self) -> None: ...

    def system(self) -> SystemInfo: ...

    def gpus(self) -> list[GpuInfo]:
        """All GPUs, ordered by index. A lost GPU is still listed (health is tracked above)."""
        ...

    def start_events(self, sink: EventSink) -> None:
        """Begin delivering XID and GPU-lost events to ``sink`` until ``close``."""
        ...

    def read_telemetry(self, index: int) -> GpuReading:
        """Everything :mod:`gpud.hw.telemetry` lists for GPU ``index`` (and its MIG instances),
        read now, for a scrape.

        Safe to call from any thread (a scrape thread, ``asyncio.to_thread``) and concurrently
        with other calls; it never blocks on events or MIG changes longer than one NVML call.
        A value NVML does not support is None, never 0; rates are None on the first read and
        come from the previous read after that. A lost GPU gives ``lost=True``; HwError only
        when the backend cannot be asked at all (not open, NVML released during a GPU reset,
        no such index).
        """
        ...


@runtime_checkable
class FaultInjector(Protocol):
    """Only the simulated backend injects faults; the control API refuses on any other."""

    def inject_xid(
        self, index: int, xid: int, gi_id: int = NO_INSTANCE, ci_id: int = NO_INSTANCE
    ) -> HwEvent:
        """An XID on GPU ``index``, scoped to a MIG instance when ``gi_id`` (and ``ci_id``) are
        given, as the driver scopes a fault inside one."""
        ...

    def inject_gpu_lost(self, index: int) -> HwEvent: ...


@runtime_checkable
class LoadSimulator(Protocol):
    """Only the simulated backend lets a load be set, for rehearsals and tests."""

    def set_load(
        self,
        index: int,
        gi_id: int | None = None,
        *,
        utilization_pct: float | None = None,
        memory_used_mib: int | None = None,
        automatic: bool = False,
    ) -> str:
        """Set the load of GPU ``index`` (MIG off) or of its GPU instance ``gi_id``.

        Values not given keep their setting; ``automatic`` first returns both to the built-in
        pattern that moves over time. Returns the setting now in effect, in words.
        INVALID_ARGUMENT for an unknown GPU or instance, a value out of range, or nothing to set.
        """
        ...


@runtime_checkable
class MigBackend(Protocol):
    """MIG control, with NVML's semantics and error kinds in both backends.

    Every method that changes the GPU is one NVML mutation (the applier counts them):
    ``set_mig_mode``, ``reset_gpu``, ``create_gpu_instance``, ``create_compute_instance``,
    ``destroy_compute_instance``, ``destroy_gpu_instance``. Errors: IN_USE (processes or child
    instances), INSUFFICIENT_RESOURCES (placement overlap, count exceeded), INVALID_ARGUMENT
    (a placement the profile does not offer, an unknown profile ID), NOT_SUPPORTED (MIG off or not
    capable), NOT_FOUND (no GPU or compute instance with that ID), NO_PERMISSION (not root).
    """

    def mig_state(self, index: int) -> MigLayoutState: ...

    def set_mig_mode(self, index: int, enabled: bool) -> MigState:
        """Request a mode; the returned state's ``pending`` differs from ``current`` until a reset
        (Ampere). Refused with IN_USE while processes use the GPU."""
        ...

    def reset_gpu(self, index: int) -> MigState:
        """Reset the GPU so a pending mode takes effect; instances do not survive it."""
        ...

    def create_gpu_instance(
        self, index: int, profile_id: int, placement: Placement
    ) -> GpuInstance: ...

    def create_compute_instance(
        self, index: int, gi_id: int, ci_profile_id: int
    ) -> ComputeInstance: ...

    def destroy_compute_instance(self, index: int, gi_id: int, ci_id: int) -> None: ...

    def destroy_gpu_instance(self, index: int, gi_id: int) -> None: ...

    def processes(self, index: int) -> tuple[GpuProcess, ...]:
        """Compute processes on the GPU and on each of its MIG devices."""
        ...
