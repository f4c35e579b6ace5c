"""GPU telemetry readings: what a scrape of ``/metrics`` or ``gpudctl top`` reads from a backend.

A backend answers :meth:`gpud.hw.backend.Backend.read_telemetry` with one :class:`GpuReading` per
call, gathered at that moment (no background thread, no polling: a node nobody scrapes costs
nothing). Values carry their unit in their name, converted the way DCGM converts what NVML
returns, so a publisher under dcgm-exporter's names only renames them
(shared/reference/cluster-integration.md §1.3, §1.4):

================================  =======================  ===================================
field                             dcgm-exporter counter    NVML source, conversion
================================  =======================  ===================================
``sm_clock_mhz``                  DCGM_FI_DEV_SM_CLOCK     nvmlDeviceGetClockInfo(SM), MHz
``mem_clock_mhz``                 DCGM_FI_DEV_MEM_CLOCK    nvmlDeviceGetClockInfo(MEM), MHz
``gpu_temp_c``                    DCGM_FI_DEV_GPU_TEMP     nvmlDeviceGetTemperatureV (or the
                                                           older nvmlDeviceGetTemperature), °C
``memory_temp_c``                 DCGM_FI_DEV_MEMORY_TEMP  field NVML_FI_DEV_MEMORY_TEMP, °C
``power_w``                       DCGM_FI_DEV_POWER_USAGE  nvmlDeviceGetPowerUsage mW / 1000.0
``energy_mj``                     DCGM_FI_DEV_TOTAL_       field NVML_FI_DEV_TOTAL_ENERGY_
                                  ENERGY_CONSUMPTION       CONSUMPTION, mJ since driver load
``pcie_replay_count``             DCGM_FI_DEV_PCIE_        field NVML_FI_DEV_PCIE_REPLAY_COUNTER
                                  REPLAY_COUNTER           (nvmlDeviceGetPcieReplayCounter's)
``gpu_util_pct``                  DCGM_FI_DEV_GPU_UTIL     nvmlDeviceGetUtilizationRates().gpu
``mem_copy_util_pct``             DCGM_FI_DEV_MEM_COPY_    nvmlDeviceGetUtilizationRates()
                                  UTIL                     .memory
``enc_util_pct``/``dec_util_pct`` DCGM_FI_DEV_ENC/DEC_UTIL nvmlDeviceGetEncoder/Decoder-
                                                           Utilization
``fb_*_mib``                      DCGM_FI_DEV_FB_FREE/     nvmlDeviceGetMemoryInfo_v2 bytes //
                                  USED/RESERVED            2**20; ``used`` excludes reserved
``nvlink_bandwidth_mb_per_s``     DCGM_FI_DEV_NVLINK_      fields NVML_FI_DEV_NVLINK_THROUGHPUT_
                                  BANDWIDTH_TOTAL          DATA_RX + _TX (KiB counters, all
                                                           links): ΔKiB / Δs / 1000, as DCGM
``vgpu_licensed``                 DCGM_FI_DEV_VGPU_        nvmlDeviceGetGridLicensableFeatures
                                  LICENSE_STATUS           (False where no license applies)
``remapped_rows_correctable``     DCGM_FI_DEV_CORRECTABLE_ field NVML_FI_DEV_REMAPPED_COR
                                  REMAPPED_ROWS
``remapped_rows_uncorrectable``   DCGM_FI_DEV_UNCORRECT-   field NVML_FI_DEV_REMAPPED_UNC
                                  ABLE_REMAPPED_ROWS
``row_remap_failure``             DCGM_FI_DEV_ROW_REMAP_   field NVML_FI_DEV_REMAPPED_FAILURE
                                  FAILURE
``gr_engine_active_ratio``        DCGM_FI_PROF_GR_ENGINE_  GPM GRAPHICS_UTIL % / 100
                                  ACTIVE
``tensor_active_ratio``           DCGM_FI_PROF_PIPE_       GPM ANY_TENSOR_UTIL % / 100
                                  TENSOR_ACTIVE
``dram_active_ratio``             DCGM_FI_PROF_DRAM_ACTIVE GPM DRAM_BW_UTIL % / 100
``pcie_tx/rx_bytes_per_s``        DCGM_FI_PROF_PCIE_TX/    GPM PCIE_TX/RX_PER_SEC MiB/s * 2**20
                                  RX_BYTES                 (NVML documents MiB/s, the DCGM
                                                           field says bytes; the reference
                                                           could not tell whether DCGM
                                                           converts: docs/hardware-
                                                           validation.md)
================================  =======================  ===================================

The driver version (DCGM_FI_DRIVER_VERSION) is :class:`gpud.hw.types.SystemInfo`'s, and the last
XID (DCGM_FI_DEV_XID_ERRORS) comes from the backend's events, not from a reading.

**Absent, never 0.** ``None`` means NVML answered NOT_SUPPORTED (or FUNCTION_NOT_FOUND), or the
value is one DCGM discards (a temperature above 200 °C), and the metric must then be absent, as
dcgm-exporter skips DCGM's blank values. In particular:

* MIG enabled: ``gpu_util_pct``, ``mem_copy_util_pct``, ``enc_util_pct``, ``dec_util_pct`` are None
  (NVML does not support them then); with GPU instances the remapped-rows fields are None too, the
  whole-GPU ``fb_*`` and GPM ratios are None, and :attr:`GpuReading.instances` holds one
  :class:`MigReading` per GPU instance (memory through its MIG device handle, GPM per instance).
  Clocks, temperatures, power, energy, PCIe and NVLink stay the parent's, repeated on every row.
* GPM (the ``DCGM_FI_PROF_*`` ratios and PCIe rates) exists on Hopper and later only: an A100, A30,
  L4 or T4 has None there (DCGM's profiling module, which serves them on older boards, has no
  public NVML equivalent).
* Rates need two samples: ``nvlink_bandwidth_mb_per_s``, the GPM ratios and the PCIe rates are
  None on a backend's first read of a GPU or instance and have values **after two scrapes**: the
  backend keeps the previous sample per GPU and per GPU instance, and a value is the average over
  the time between the two reads. A new MIG layout, a GPU reset or a backend restart starts over.

A GPU NVML reports lost has ``lost=True`` and every value None. Errors other than "not supported"
on single values leave that value None and are listed in :attr:`GpuReading.errors`, so a scrape
still answers for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIB = 1024 * 1024

MAX_VALID_TEMP_C = 200
"""DCGM treats a temperature above this as a read error and reports nothing."""


@dataclass(frozen=True, slots=True)
class MigReading:
    """One MIG GPU instance: its memory (through its MIG device) and its GPM activity."""

    gi_id: int
    fb_total_mib: int | None = None
    fb_free_mib: int | None = None
    fb_used_mib: int | None = None
    fb_reserved_mib: int | None = None
    gr_engine_active_ratio: float | None = None
    tensor_active_ratio: float | None = None
    dram_active_ratio: float | None = None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One physical GPU at one moment; see the module docstring for each field.

    ``nvml_calls`` is how many NVML calls the read made (0 on the simulated backend, which makes
    none), for benchmarks; ``errors`` says which values failed and why.
    """

    index: int
    uuid: str
    lost: bool = False
    mig_enabled: bool = False
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    gpu_temp_c: int | None = None
    memory_temp_c: int | None = None
    power_w: float | None = None
    energy_mj: int | None = None
    pcie_replay_count: int | None = None
    gpu_util_pct: int | None = None
    mem_copy_util_pct: int | None = None
    enc_util_pct: int | None = None
    dec_util_pct: int | None = None
    fb_total_mib: int | None = None
    fb_free_mib: int | None = None
    fb_used_mib: int | None = None
    fb_reserved_mib: int | None = None
    nvlink_bandwidth_mb_per_s: float | None = None
    vgpu_licensed: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_failure: bool | None = None
    gr_engine_active_ratio: float | None = None
    tensor_active_ratio: float | None = None
    dram_active_ratio: float | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    instances: tuple[MigReading, ...] = ()
    nvml_calls: int = field(default=0, compare=False)
    errors: tuple[str, ...] = field(default=(), compare=False)

    def instance(self, gi_id: int) -> MigReading | None:
        for reading in self.instances:
            if reading.gi_id == gi_id:
                return reading
        return None


# ---- conversions, as DCGM makes them ---------------------------------------------------------


def mib(value_bytes: int) -> int:
    """Bytes to whole MiB, rounded down (DCGM's integer division by 1048576)."""
    return value_bytes // MIB


def watts(milliwatts: int) -> float:
    return milliwatts / 1000.0


def temperature(celsius: int) -> int | None:
    """A temperature as DCGM keeps it: above 200 °C is a read error, reported as nothing."""
    return celsius if 0 <= celsius <= MAX_VALID_TEMP_C else None


def gpm_ratio(percent: float) -> float:
    """A GPM utilization (0.0-100.0) as the 0-1 ratio of the DCGM_FI_PROF_* fields."""
    return percent / 100.0


def mib_per_s_to_bytes(mib_per_s: float) -> float:
    return mib_per_s * MIB


@dataclass(frozen=True, slots=True)
class CounterSample:
    """A cumulative counter's value at a time (seconds; any fixed origin)."""

    at_s: float
    value: float


def counter_rate(previous: CounterSample | None, current: CounterSample) -> float | None:
    """The counter's average rate per second between two samples.

    None without a previous sample, when time did not advance, or when the counter went back (a
    driver reload or a GPU reset zeroes it): one interval is lost rather than a spike reported.
    """
    if previous is None:
        return None
    elapsed = current.at_s - previous.at_s
    delta = current.value - previous.value
    if elapsed <= 0 or delta < 0 or not math.isfinite(delta):
        return None
    return delta / elapsed


def nvlink_mb_per_s(previous: CounterSample | None, current: CounterSample) -> float | None:
    """DCGM's NVLink bandwidth from the RX+TX throughput counters (KiB): ΔKiB / Δs / 1000."""
    rate = counter_rate(previous, current)
    return None if rate is None else rate / 1000.0
