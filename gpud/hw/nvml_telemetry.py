"""Scrape-time telemetry over NVML: one :class:`~gpud.hw.telemetry.GpuReading` per call.

The NVML backend delegates :meth:`~gpud.hw.backend.Backend.read_telemetry` here; with
:mod:`gpud.hw.nvml` this is the only code that calls pynvml. A read makes the calls DCGM makes for
dcgm-exporter's default counters (shared/reference/cluster-integration.md §1.3), with as few
calls as that allows:

* every value NVML offers as a field (memory temperature, energy, PCIe replays, the NVLink
  throughput counters, remapped rows) comes from one ``nvmlDeviceGetFieldValues`` call;
* what cannot change without gpud knowing is kept between reads: the device handle and UUID,
  whether the board has GPM, and the MIG devices of each GPU instance. The backend drops them
  (:meth:`NvmlTelemetry.invalidate`) around every MIG change and every MIG state read, so they are
  never staler than gpud's own view of the layout;
* calls NVML documents as unsupported in MIG mode (utilization, encoder, decoder) are not made
  there, and the whole GPU's memory is not read while MIG devices report their own.

Rates need two samples: the NVLink counters and the GPM samples of each GPU and GPU instance are
kept from one read to the next (two GPM samples per GPU or instance, used in turn), so the first
read of each has None there. No thread and no timer: a GPU nobody reads costs nothing.

Reads of different GPUs may run in parallel; reads of one GPU are serialised, because they share
its previous samples.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.telemetry import (
    CounterSample,
    GpuReading,
    MigReading,
    gpm_ratio,
    mib,
    mib_per_s_to_bytes,
    nvlink_mb_per_s,
    temperature,
    watts,
)

_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})

_ALL_LINKS = 0xFFFFFFFF  # scopeId asking an NVLink field for the sum over every link

# The field batch: (field ID, scope ID). Order matters only for reading the answer back.
_FIELDS: tuple[tuple[int, int], ...] = (
    (pynvml.NVML_FI_DEV_MEMORY_TEMP, 0),
    (pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, 0),
    (pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, 0),
    (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
    (pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS),
    (pynvml.NVML_FI_DEV_REMAPPED_COR, 0),
    (pynvml.NVML_FI_DEV_REMAPPED_UNC, 0),
    (pynvml.NVML_FI_DEV_REMAPPED_FAILURE, 0),
)

_FIELD_NAMES = {
    pynvml.NVML_FI_DEV_MEMORY_TEMP: "memory temperature",
    pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: "total energy",
    pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: "PCIe replay counter",
    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: "NVLink TX throughput",
    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: "NVLink RX throughput",
    pynvml.NVML_FI_DEV_REMAPPED_COR: "correctable remapped rows",
    pynvml.NVML_FI_DEV_REMAPPED_UNC: "uncorrectable remapped rows",
    pynvml.NVML_FI_DEV_REMAPPED_FAILURE: "row remapping failure",
}

_GPM_ACTIVITY = (
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL,
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
)
_GPM_PCIE = (pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC)

_VALUE_READERS: dict[int, Callable[[Any], float | int]] = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: lambda v: v.dVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: lambda v: v.uiVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda v: v.ulVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: lambda v: v.ullVal,
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda v: v.sllVal,
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: lambda v: v.siVal,
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: lambda v: v.usVal,
}


class _Lost(Exception):
    """NVML answered GPU_IS_LOST: the reading is over."""


class _Read:
    """One read of one GPU: counts its NVML calls and keeps the errors that left values empty."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.calls = 0
        self.errors: list[str] = []

    def raw(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call pynvml, counted; NVMLError propagates (after GPU_IS_LOST ends the read)."""
        self.calls += 1
        try:
            return fn(*args)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost from err
            if err.value == pynvml.NVML_ERROR_UNINITIALIZED:
                raise HwError(ErrorKind.UNINITIALIZED, f"{self.where}: NVML is not open") from err
            raise

    def value(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A value, or None when NVML does not support it (or failed: then it is noted)."""
        try:
            return self.raw(fn, *args)
        except pynvml.NVMLError as err:
            self.fail(what, err)
            return None

    def fail(self, what: str, err: pynvml.NVMLError) -> None:
        if err.value not in _ABSENT:
            self.errors.append(f"{self.where}: {what}: {err}")


@dataclass
class _Device:
    """What is kept of one GPU between reads, valid while ``generation`` is current."""

    generation: int
    layout: int
    handle: Any
    uuid: str
    # One MIG device handle per GPU instance, by GI ID, once read in this generation.
    instances: tuple[tuple[int, Any], ...] | None = None


@dataclass
class _GpmPair:
    """Two GPM samples of one GPU or instance, used in turn; ``previous`` holds the last read."""

    samples: tuple[Any, Any]
    previous: Any | None = None

    @property
    def spare(self) -> Any:
        return self.samples[1] if self.previous is self.samples[0] else self.samples[0]


@dataclass
class _Gpu:
    """Per-GPU state: its lock and what reads carry over."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    device: _Device | None = None
    nvlink: CounterSample | None = None
    gpm: dict[int | None, _GpmPair] = field(default_factory=dict)
    gpm_supported: bool | None = None


class NvmlTelemetry:
    """Readings of every GPU of one NVML session; ``uuid_when_lost`` names a GPU whose UUID NVML
    can no longer tell."""

    def __init__(self, uuid_when_lost: Callable[[int], str]) -> None:
        self._uuid_when_lost = uuid_when_lost
        self._lock = threading.Lock()
        self._gpus: dict[int, _Gpu] = {}
        self._generation = 0
        self._layouts: dict[int, int] = {}
        # Fallbacks for drivers without the newer entry points, learnt once.
        self._memory_v1 = False
        self._temperature_v1 = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def invalidate(self, index: int | None = None) -> None:
        """Handles and MIG devices may have changed: look them up again on the next read.

        With ``index`` the layout of that GPU may have changed as well, so its GPM samples are
        dropped: a new GPU instance may reuse an old one's ID, and a rate across the two would be
        nonsense.
        """
        with self._lock:
            self._generation += 1
            if index is not None:
                self._layouts[index] = self._layouts.get(index, 0) + 1

    def release(self) -> None:
        """Free every GPM sample and forget everything; NVML must still be open."""
        with self._lock:
            gpus, self._gpus = list(self._gpus.values()), {}
            self._generation += 1
        for gpu in gpus:
            with gpu.lock:
                for pair in gpu.gpm.values():
                    _free(pair)
                gpu.gpm.clear()

    def _gpu(self, index: int) -> _Gpu:
        with self._lock:
            gpu = self._gpus.get(index)
            if gpu is None:
                gpu = self._gpus[index] = _Gpu()
            return gpu

    def _current(self, index: int) -> tuple[int, int]:
        with self._lock:
            return self._generation, self._layouts.get(index, 0)

    # ---- reading -------------------------------------------------------------------------------

    def read(self, index: int) -> GpuReading:
        read = _Read(f"GPU {index}")
        while True:
            gpu = self._gpu(index)
            with gpu.lock:
                # A release() while this read waited orphans ``gpu``: samples allocated into it
                # would never be freed, so read into the current one.
                if self._gpus.get(index) is not gpu:
                    continue
                try:
                    return self._read(index, gpu, read)
                except _Lost:
                    device, gpu.device = gpu.device, None
                    uuid = device.uuid if device is not None else self._uuid_when_lost(index)
                    return GpuReading(
                        index, uuid, lost=True, nvml_calls=read.calls, errors=tuple(read.errors)
                    )

    def _read(self, index: int, gpu: _Gpu, read: _Read) -> GpuReading:
        device = self._device(index, gpu, read)
        handle = device.handle
        slots = read.value("count MIG devices", pynvml.nvmlDeviceGetMaxMigDeviceCount, handle)
        mig_enabled = bool(slots)
        instances = self._instances(device, slots or 0, read) if mig_enabled else ()
        if not mig_enabled:
            device.instances = None

        values: dict[str, Any] = {}
        values.update(self._fields(gpu, handle, read, drop_remapped=bool(instances)))
        values["sm_clock_mhz"] = read.value(
            "read the SM clock", pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM
        )
        values["mem_clock_mhz"] = read.value(
            "read the memory clock", pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM
        )
        values["gpu_temp_c"] = self._temperature(handle, read)
        power = read.value("read power usage", pynvml.nvmlDeviceGetPowerUsage, handle)
        values["power_w"] = None if power is None else watts(power)
        values["vgpu_licensed"] = _licensed(
            read.value("read vGPU licensing", pynvml.nvmlDeviceGetGridLicensableFeatures_v4, handle)
        )
        if not mig_enabled:
            values.update(self._utilization(handle, read))
        if not instances:
            values.update(self._memory("read memory", handle, read))

        mig_readings: list[MigReading] = []
        if self._has_gpm(gpu, handle, read):
            _drop_stale_gpm(gpu, instances)
            # With GPU instances the activity is theirs (below); PCIe stays the whole GPU's.
            wanted = _GPM_PCIE if instances else _GPM_ACTIVITY + _GPM_PCIE
            metrics = self._gpm(gpu, None, read, wanted, pynvml.nvmlGpmSampleGet, handle)
            if not instances:
                values.update(_activity(metrics))
            values.update(_pcie(metrics))
        for gi_id, mig_handle in instances:
            memory = self._memory(f"read memory of GPU instance {gi_id}", mig_handle, read)
            activity: dict[str, float | None] = {}
            if gpu.gpm_supported:
                found = self._gpm(
                    gpu,
                    gi_id,
                    read,
                    _GPM_ACTIVITY,
                    lambda h, s, gi=gi_id: pynvml.nvmlGpmMigSampleGet(h, gi, s),
                    handle,
                )
                activity = _activity(found)
            mig_readings.append(MigReading(gi_id, **memory, **activity))
        return GpuReading(
            index=index,
            uuid=device.uuid,
            mig_enabled=mig_enabled,
            instances=tuple(mig_readings),
            nvml_calls=read.calls,
            errors=tuple(read.errors),
            **values,
        )

    def _device(self, index: int, gpu: _Gpu, read: _Read) -> _Device:
        generation, layout = self._current(index)
        device = gpu.device
        if device is not None and device.generation == generation:
            return device
        try:
            handle = read.raw(pynvml.nvmlDeviceGetHandleByIndex, index)
            uuid = read.raw(pynvml.nvmlDeviceGetUUID, handle)
        except pynvml.NVMLError as err:
            raise HwError(_kind(err.value), f"GPU {index}: {err}") from err
        if device is None or device.uuid != uuid or device.layout != layout:
            for pair in gpu.gpm.values():  # another board, or another layout: start over
                _free(pair)
            gpu.gpm.clear()
            if device is None or device.uuid != uuid:
                gpu.nvlink, gpu.gpm_supported = None, None
        gpu.device = _Device(generation, layout, handle, uuid)
        return gpu.device

    def _instances(self, device: _Device, slots: int, read: _Read) -> tuple[tuple[int, Any], ...]:
        """One MIG device handle per GPU instance (the lowest slot of each), kept for the
        generation; a failed lookup is not kept, so the next read tries again."""
        if device.instances is not None:
            return device.instances
        found: dict[int, Any] = {}
        complete = True
        for slot in range(slots):
            try:
                mig = read.raw(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, device.handle, slot)
            except pynvml.NVMLError as err:
                if err.value != pynvml.NVML_ERROR_NOT_FOUND:  # NOT_FOUND: an empty slot
                    read.fail(f"get MIG device {slot}", err)
                    complete = False
                continue
            gi_id = read.value(
                f"read the GPU instance of MIG device {slot}",
                pynvml.nvmlDeviceGetGpuInstanceId,
                mig,
            )
            if gi_id is None:
                complete = False
                continue
            found.setdefault(gi_id, mig)
        instances = tuple(sorted(found.items()))
        if complete:
            device.instances = instances
        return instances

    def _fields(
        self, gpu: _Gpu, handle: Any, read: _Read, *, drop_remapped: bool
    ) -> dict[str, Any]:
        """The field batch in one call, each value None where its own return code says so."""
        got: dict[int, Any] = {}
        stamps: list[int] = []
        try:
            answers = read.raw(pynvml.nvmlDeviceGetFieldValues, handle, list(_FIELDS))
        except pynvml.NVMLError as err:
            read.fail("read field values", err)
            answers = []
        for answer in answers:
            field_id = answer.fieldId
            if answer.nvmlReturn != pynvml.NVML_SUCCESS:
                read.fail(
                    f"read {_FIELD_NAMES.get(field_id, field_id)}",
                    pynvml.NVMLError(answer.nvmlReturn),
                )
                continue
            reader = _VALUE_READERS.get(answer.valueType)
            if reader is None:
                read.errors.append(f"{read.where}: field {field_id}: value type {answer.valueType}")
                continue
            got[field_id] = reader(answer.value)
            if field_id in (
                pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
            ):
                stamps.append(answer.timestamp)

        tx = got.get(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX)
        rx = got.get(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX)
        bandwidth = None
        if tx is not None and rx is not None:
            # NVML stamps field values in microseconds; a driver that leaves them 0 gets ours.
            at_s = max(stamps) / 1e6 if stamps and min(stamps) > 0 else time.time()
            sample = CounterSample(at_s, float(tx + rx))
            bandwidth = nvlink_mb_per_s(gpu.nvlink, sample)
            gpu.nvlink = sample
        else:
            gpu.nvlink = None
        memory_temp = got.get(pynvml.NVML_FI_DEV_MEMORY_TEMP)
        energy = got.get(pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION)
        replays = got.get(pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER)
        values: dict[str, Any] = {
            "memory_temp_c": None if memory_temp is None else temperature(int(memory_temp)),
            "energy_mj": None if energy is None else int(energy),
            "pcie_replay_count": None if replays is None else int(replays),
            "nvlink_bandwidth_mb_per_s": bandwidth,
        }
        if not drop_remapped:
            # NVML refuses these while GPU instances exist; a driver answering anyway would give
            # the parent's count on instance rows, which DCGM does not show either.
            failure = got.get(pynvml.NVML_FI_DEV_REMAPPED_FAILURE)
            correctable = got.get(pynvml.NVML_FI_DEV_REMAPPED_COR)
            uncorrectable = got.get(pynvml.NVML_FI_DEV_REMAPPED_UNC)
            values["remapped_rows_correctable"] = _int(correctable)
            values["remapped_rows_uncorrectable"] = _int(uncorrectable)
            values["row_remap_failure"] = None if failure is None else bool(failure)
        return values

    def _temperature(self, handle: Any, read: _Read) -> int | None:
        """``nvmlDeviceGetTemperatureV`` (NVML 13 deprecates the older call), or the older call
        on a driver without it."""
        what = "read the GPU temperature"
        if not self._temperature_v1:
            try:
                value = read.raw(
                    pynvml.nvmlDeviceGetTemperatureV, handle, pynvml.NVML_TEMPERATURE_GPU
                )
                return temperature(value)
            except pynvml.NVMLError as err:
                if err.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                    read.fail(what, err)
                    return None
                self._temperature_v1 = True
        value = read.value(
            what, pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
        )
        return None if value is None else temperature(value)

    def _memory(self, what: str, handle: Any, read: _Read) -> dict[str, int | None]:
        """``nvmlDeviceGetMemoryInfo_v2`` (used excludes reserved), or v1 on a driver older than
        510, whose used includes reserved and which has no reserved figure."""
        absent: dict[str, int | None] = {
            "fb_total_mib": None,
            "fb_free_mib": None,
            "fb_used_mib": None,
            "fb_reserved_mib": None,
        }
        if not self._memory_v1:
            try:
                info = read.raw(pynvml.nvmlDeviceGetMemoryInfo, handle, pynvml.nvmlMemory_v2)
            except pynvml.NVMLError as err:
                if err.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                    read.fail(what, err)
                    return absent
                self._memory_v1 = True
            else:
                return {
                    "fb_total_mib": mib(info.total),
                    "fb_free_mib": mib(info.free),
                    "fb_used_mib": mib(info.used),
                    "fb_reserved_mib": mib(info.reserved),
                }
        info = read.value(what, pynvml.nvmlDeviceGetMemoryInfo, handle)
        if info is None:
            return absent
        return {
            "fb_total_mib": mib(info.total),
            "fb_free_mib": mib(info.free),
            "fb_used_mib": mib(info.used),
            "fb_reserved_mib": None,
        }

    @staticmethod
    def _utilization(handle: Any, read: _Read) -> dict[str, int | None]:
        rates = read.value("read utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
        encoder = read.value(
            "read encoder utilization", pynvml.nvmlDeviceGetEncoderUtilization, handle
        )
        decoder = read.value(
            "read decoder utilization", pynvml.nvmlDeviceGetDecoderUtilization, handle
        )
        return {
            "gpu_util_pct": None if rates is None else rates.gpu,
            "mem_copy_util_pct": None if rates is None else rates.memory,
            "enc_util_pct": None if encoder is None else encoder[0],
            "dec_util_pct": None if decoder is None else decoder[0],
        }

    # ---- GPM -----------------------------------------------------------------------------------

    @staticmethod
    def _has_gpm(gpu: _Gpu, handle: Any, read: _Read) -> bool:
        """Whether the board has GPM (Hopper and later), asked once per board."""
        if gpu.gpm_supported is None:
            support = read.value("query GPM support", pynvml.nvmlGpmQueryDeviceSupport, handle)
            gpu.gpm_supported = bool(support is not None and support.isSupportedDevice)
        return gpu.gpm_supported

    def _gpm(
        self,
        gpu: _Gpu,
        gi_id: int | None,
        read: _Read,
        metrics: tuple[int, ...],
        take: Callable[[Any, Any], Any],
        handle: Any,
    ) -> dict[int, float]:
        """Take a GPM sample of the GPU (``gi_id`` None) or one instance, and the metrics between
        it and the previous read's sample; empty on the first read."""
        where = "GPM" if gi_id is None else f"GPM of GPU instance {gi_id}"
        pair = gpu.gpm.get(gi_id)
        if pair is None:
            try:
                first = read.raw(pynvml.nvmlGpmSampleAlloc)
                second = read.raw(pynvml.nvmlGpmSampleAlloc)
            except pynvml.NVMLError as err:
                read.fail(f"allocate {where} samples", err)
                return {}
            pair = gpu.gpm[gi_id] = _GpmPair((first, second))
        current = pair.spare
        try:
            read.raw(take, handle, current)
        except pynvml.NVMLError as err:
            read.fail(f"take a {where} sample", err)
            pair.previous = None
            return {}
        previous, pair.previous = pair.previous, current
        if previous is None:
            return {}
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(metrics)
        request.sample1, request.sample2 = previous, current
        for slot, metric in enumerate(metrics):
            request.metrics[slot].metricId = metric
        try:
            read.raw(pynvml.nvmlGpmMetricsGet, request)
        except pynvml.NVMLError as err:
            read.fail(f"compute {where} metrics", err)
            return {}
        found: dict[int, float] = {}
        for answer in request.metrics[: len(metrics)]:
            if answer.nvmlReturn == pynvml.NVML_SUCCESS:
                found[answer.metricId] = answer.value
            else:
                read.fail(f"{where} metric {answer.metricId}", pynvml.NVMLError(answer.nvmlReturn))
        return found


def _drop_stale_gpm(gpu: _Gpu, instances: tuple[tuple[int, Any], ...]) -> None:
    """Free the samples of GPU instances that are gone."""
    keep = {gi for gi, _ in instances} | {None}
    for key in [k for k in gpu.gpm if k not in keep]:
        _free(gpu.gpm.pop(key))


def _activity(metrics: dict[int, float]) -> dict[str, float | None]:
    def ratio(metric: int) -> float | None:
        value = metrics.get(metric)
        return None if value is None else gpm_ratio(value)

    return {
        "gr_engine_active_ratio": ratio(pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL),
        "tensor_active_ratio": ratio(pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL),
        "dram_active_ratio": ratio(pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL),
    }


def _pcie(metrics: dict[int, float]) -> dict[str, float | None]:
    tx = metrics.get(pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC)
    rx = metrics.get(pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC)
    return {
        "pcie_tx_bytes_per_s": None if tx is None else mib_per_s_to_bytes(tx),
        "pcie_rx_bytes_per_s": None if rx is None else mib_per_s_to_bytes(rx),
    }


def _licensed(features: Any) -> bool | None:
    """DCGM's vGPU license status: False where licensing does not apply, else whether the vGPU
    feature is licensed."""
    if features is None:
        return None
    if not features.isGridLicenseSupported:
        return False
    count = min(features.licensableFeaturesCount, len(features.gridLicensableFeatures))
    return any(
        f.featureCode == pynvml.NVML_GRID_LICENSE_FEATURE_CODE_VGPU and f.featureState > 0
        for f in features.gridLicensableFeatures[:count]
    )


def _int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def _free(pair: _GpmPair) -> None:
    for sample in pair.samples:
        # An error means NVML already let go (shut down or reset): nothing left to free.
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlGpmSampleFree(sample)


def _kind(code: int) -> ErrorKind:
    try:
        return ErrorKind(code)
    except ValueError:
        return ErrorKind.UNKNOWN
