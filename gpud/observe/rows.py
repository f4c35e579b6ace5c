"""One row per device an operator can point at: the pure join of the node state, the GPUs'
readings and the pods holding each device.

A whole GPU is one row; a GPU with MIG devices is one row per MIG device and none for itself, as
dcgm-exporter reports it (shared/reference/cluster-integration.md §1.4). Rows never fail: a GPU
that could not be read has no reading, a lost one is an unhealthy row, and a device withdrawn
during a MIG apply is marked so, whatever the hardware holds at that instant.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from gpud.hw.backend import Backend
from gpud.hw.errors import HwError
from gpud.hw.telemetry import GpuReading, MigReading
from gpud.hw.types import GpuInfo
from gpud.node.state import DeviceState, NodeState, XidRecord
from gpud.observe.pods import PodRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A whole GPU (``mig_uuid`` None) or one MIG device on ``gpu``.

    ``reading`` is the physical GPU's (None: not read, or the backend failed); ``instance`` is the
    MIG device's GPU instance within it. Clocks, temperature and power are always the GPU's.
    """

    gpu: GpuInfo
    reading: GpuReading | None
    mig_uuid: str | None
    gi_id: int | None
    ci_id: int | None
    profile: str | None
    instance: MigReading | None
    healthy: bool
    reason: str
    withdrawn: bool
    last_xid: XidRecord | None
    pods: tuple[PodRef, ...]

    @property
    def uuid(self) -> str:
        """The device's own UUID: the MIG device's, else the GPU's."""
        return self.mig_uuid or self.gpu.uuid

    @property
    def utilization_pct(self) -> float | None:
        """The GPU's utilization; a MIG device's graphics-engine activity (GPM), since NVML has
        no utilization for MIG devices; None where neither exists (MIG on an A100)."""
        if self.mig_uuid is None:
            return None if self.reading is None else self.reading.gpu_util_pct
        if self.instance is None or self.instance.gr_engine_active_ratio is None:
            return None
        return self.instance.gr_engine_active_ratio * 100.0

    @property
    def memory_used_mib(self) -> int | None:
        source = self.instance if self.mig_uuid is not None else self.reading
        return None if source is None else source.fb_used_mib

    @property
    def memory_total_mib(self) -> int | None:
        source = self.instance if self.mig_uuid is not None else self.reading
        return None if source is None else source.fb_total_mib

    @property
    def temperature_c(self) -> int | None:
        return None if self.reading is None else self.reading.gpu_temp_c

    @property
    def power_w(self) -> float | None:
        return None if self.reading is None else self.reading.power_w


def device_rows(
    state: NodeState,
    readings: Mapping[int, GpuReading],
    holders: Mapping[str, tuple[PodRef, ...]],
) -> tuple[DeviceRow, ...]:
    """Rows by GPU index, then GPU and compute instance IDs; lost GPUs included (unhealthy)."""
    devices: dict[str, list[DeviceState]] = {}
    for device in state.devices:
        devices.setdefault(device.gpu_uuid, []).append(device)
    rows: list[DeviceRow] = []
    for gpu in sorted(state.gpus, key=lambda g: g.index):
        reading = readings.get(gpu.index)
        if reading is not None and reading.uuid != gpu.uuid:
            reading = None  # read before the GPU set changed: not this GPU's
        own = devices.get(gpu.uuid, [])
        migs = sorted((d for d in own if d.is_mig), key=lambda d: (d.gi_id, d.ci_id))
        if not migs:
            whole = next((d for d in own if not d.is_mig), None)
            rows.append(_row(gpu, reading, whole, None, holders.get(gpu.uuid, ())))
            continue
        for device in migs:
            assert device.gi_id is not None
            instance = None if reading is None else reading.instance(device.gi_id)
            rows.append(_row(gpu, reading, device, instance, holders.get(device.uuid, ())))
    return tuple(rows)


def _row(
    gpu: GpuInfo,
    reading: GpuReading | None,
    device: DeviceState | None,
    instance: MigReading | None,
    pods: tuple[PodRef, ...],
) -> DeviceRow:
    if device is None:  # a GPU the snapshot lists but has no device for: trust the GPU record
        healthy, reason = not gpu.lost, "GPU lost" if gpu.lost else ""
        return DeviceRow(
            gpu, reading, None, None, None, None, None, healthy, reason, False, None, pods
        )
    return DeviceRow(
        gpu=gpu,
        reading=reading,
        mig_uuid=device.uuid if device.is_mig else None,
        gi_id=device.gi_id,
        ci_id=device.ci_id,
        profile=device.profile,
        instance=instance,
        healthy=device.healthy,
        reason=device.reason,
        withdrawn=device.withdrawn,
        last_xid=device.last_xid,
        pods=pods,
    )


def read_all(backend: Backend, state: NodeState) -> dict[int, GpuReading]:
    """Every GPU's reading now, by index; a GPU the backend cannot read is left out (logged), so
    its rows carry no values rather than failing the whole answer."""
    readings: dict[int, GpuReading] = {}
    if state.backend_error:
        return readings
    for gpu in state.gpus:
        try:
            readings[gpu.index] = backend.read_telemetry(gpu.index)
        except HwError as exc:
            log.debug("cannot read GPU %d: %s", gpu.index, exc)
    return readings
