"""Telemetry over the NVML backend, tested below pynvml: the fake library's callbacks get pynvml's
real structures (field values, memory v2, GPM metrics), so units, conversions and the absent-not-0
rules are checked on the bytes NVML would hand back."""

from __future__ import annotations

import threading

import pynvml
import pytest

from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.nvml import NvmlBackend
from gpud.hw.telemetry import (
    CounterSample,
    GpuReading,
    counter_rate,
    mib,
    nvlink_mb_per_s,
    temperature,
    watts,
)
from gpud.hw.types import Placement
from tests.fakenvml import (
    GPM_ANY_TENSOR_UTIL,
    GPM_DRAM_BW_UTIL,
    GPM_GRAPHICS_UTIL,
    MIG_ENABLE,
    FakeNvml,
    Ret,
    dgx_a100,
    dgx_h100,
    t4,
)

H100_1G_10GB = 19  # GPU instance profile ID of 1g.10gb on H100 80GB (and 1g.5gb on A100 40GB)
FULL_CI = 0  # the compute-instance profile spanning a one-slice GI


class Clock:
    """The fake driver's wall clock, stepped by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def nvml(fake_nvml):
    """``fake, backend = nvml(dgx_h100())``: an installed fake with a stepped clock, and an open
    backend over it."""
    opened: list[NvmlBackend] = []

    def make(fake: FakeNvml) -> tuple[FakeNvml, NvmlBackend, Clock]:
        clock = Clock()
        fake.clock = clock
        fake_nvml(fake)
        backend = NvmlBackend()
        backend.open()
        opened.append(backend)
        return fake, backend, clock

    yield make
    for backend in opened:
        backend.close()


def read_twice(backend: NvmlBackend, clock: Clock, index: int = 0) -> tuple[GpuReading, GpuReading]:
    first = backend.read_telemetry(index)
    clock.now += 15.0
    return first, backend.read_telemetry(index)


def mig_h100(fake: FakeNvml, backend: NvmlBackend, index: int = 0, count: int = 7) -> list[int]:
    """Turn MIG on for GPU ``index`` (Hopper switches at once) and create ``count`` 1g GPU
    instances, each with its compute instance; returns their GI IDs."""
    backend.set_mig_mode(index, True)
    assert fake.gpus[index].mig == (MIG_ENABLE, MIG_ENABLE)
    made = []
    for slot in range(count):
        gi = backend.create_gpu_instance(index, H100_1G_10GB, Placement(slot, 1))
        backend.create_compute_instance(index, gi.gi_id, FULL_CI)
        made.append(gi.gi_id)
    return made


# ---- conversions --------------------------------------------------------------------------------


def test_conversions_are_dcgms() -> None:
    assert mib(20 * 2**20 + 2**20 - 1) == 20  # integer MiB, rounded down
    assert watts(254_321) == 254.321
    assert temperature(200) == 200
    assert temperature(201) is None  # DCGM's "read error" bound
    assert temperature(-1) is None


def test_counter_rates_need_two_samples_and_a_forward_counter() -> None:
    assert counter_rate(None, CounterSample(10.0, 5.0)) is None
    assert counter_rate(CounterSample(10.0, 5.0), CounterSample(10.0, 9.0)) is None
    assert counter_rate(CounterSample(10.0, 9.0), CounterSample(20.0, 5.0)) is None  # reset
    assert counter_rate(CounterSample(10.0, 5.0), CounterSample(12.0, 9.0)) == 2.0
    # DCGM: (sum of RX and TX KiB) per second, divided by 1000.
    assert nvlink_mb_per_s(CounterSample(0.0, 0.0), CounterSample(2.0, 4_000_000.0)) == 2000.0


# ---- a whole GPU --------------------------------------------------------------------------------


def test_a100_reads_every_counter_in_dcgms_units(nvml) -> None:
    fake, backend, clock = nvml(dgx_a100())
    t = fake.gpus[2].telemetry

    first = backend.read_telemetry(2)
    assert (first.index, first.uuid, first.lost, first.mig_enabled) == (
        2,
        fake.gpus[2].uuid,
        False,
        False,
    )
    assert (first.sm_clock_mhz, first.mem_clock_mhz) == (t.sm_clock_mhz, t.mem_clock_mhz)
    assert (first.gpu_temp_c, first.memory_temp_c) == (t.gpu_temp_c, t.memory_temp_c)
    assert first.power_w == t.power_mw / 1000.0
    assert first.energy_mj == t.energy_mj
    assert first.pcie_replay_count == t.pcie_replays
    assert (first.gpu_util_pct, first.mem_copy_util_pct) == (t.gpu_util, t.mem_util)
    assert (first.enc_util_pct, first.dec_util_pct) == (t.enc_util, t.dec_util)
    # Memory v2: used excludes reserved, so total = free + used + reserved.
    assert (first.fb_total_mib, first.fb_used_mib, first.fb_reserved_mib) == (40960, 20480, 579)
    assert first.fb_free_mib == 40960 - 20480 - 579
    assert (first.remapped_rows_correctable, first.remapped_rows_uncorrectable) == (2, 1)
    assert first.row_remap_failure is False
    assert first.vgpu_licensed is False  # bare metal: licensing does not apply, DCGM says 0
    assert first.nvlink_bandwidth_mb_per_s is None  # a rate: only from the second read on
    assert first.errors == ()

    t.nvlink_tx_kib += 3_000_000
    t.nvlink_rx_kib += 1_500_000
    clock.now += 15.0
    second = backend.read_telemetry(2)
    assert second.nvlink_bandwidth_mb_per_s == pytest.approx(4_500_000 / 15.0 / 1000.0)
    # A100 has no GPM: the DCGM_FI_PROF_* values stay absent, not 0, however often it is read.
    for reading in (first, second):
        assert reading.gr_engine_active_ratio is None
        assert reading.tensor_active_ratio is None
        assert reading.dram_active_ratio is None
        assert reading.pcie_tx_bytes_per_s is None and reading.pcie_rx_bytes_per_s is None
    assert fake.gpm_samples == {}


def test_h100_serves_gpm_ratios_after_two_reads(nvml) -> None:
    fake, backend, clock = nvml(dgx_h100())
    first, second = read_twice(backend, clock)

    assert first.gr_engine_active_ratio is None and first.pcie_tx_bytes_per_s is None
    assert second.gr_engine_active_ratio == pytest.approx(0.725)
    assert second.tensor_active_ratio == pytest.approx(0.4125)
    assert second.dram_active_ratio == pytest.approx(0.55)
    # NVML documents MiB/s; the reading is bytes/s, as the DCGM field's name says.
    assert second.pcie_tx_bytes_per_s == 1536.0 * 2**20
    assert second.pcie_rx_bytes_per_s == 2048.0 * 2**20
    assert second.nvlink_bandwidth_mb_per_s == 0.0  # counters read, nothing moved: 0, not absent
    assert (second.power_w, second.memory_temp_c) == (512.345, 61)

    fake.gpus[0].telemetry.gpm[GPM_GRAPHICS_UTIL] = 10.0  # type: ignore[index]
    clock.now += 15.0
    assert backend.read_telemetry(0).gr_engine_active_ratio == pytest.approx(0.1)
    assert len(fake.gpm_samples) == 2  # two samples per GPU, used in turn


def test_t4_lacks_what_a_turing_gddr_pcie_board_lacks(nvml) -> None:
    _, backend, clock = nvml(t4())
    first, second = read_twice(backend, clock)
    for reading in (first, second):
        assert reading.memory_temp_c is None
        assert reading.remapped_rows_correctable is None
        assert reading.remapped_rows_uncorrectable is None
        assert reading.row_remap_failure is None
        assert reading.nvlink_bandwidth_mb_per_s is None
        assert reading.gr_engine_active_ratio is None
        assert reading.errors == ()  # not supported is not an error
    assert (second.gpu_temp_c, second.power_w, second.fb_total_mib) == (38, 27.891, 15360)
    assert second.gpu_util_pct == 67


def test_implausible_temperatures_are_dropped_as_dcgm_drops_them(nvml) -> None:
    fake, backend, _ = nvml(dgx_a100())
    fake.gpus[0].telemetry.gpu_temp_c = 255
    fake.gpus[0].telemetry.memory_temp_c = 201
    reading = backend.read_telemetry(0)
    assert (reading.gpu_temp_c, reading.memory_temp_c) == (None, None)
    assert reading.power_w is not None


def test_a_failure_leaves_one_value_absent_and_says_why(nvml) -> None:
    fake, backend, _ = nvml(dgx_a100())
    fake.gpus[0].errors["nvmlDeviceGetPowerUsage"] = Ret.UNKNOWN
    reading = backend.read_telemetry(0)
    assert reading.power_w is None
    assert reading.gpu_temp_c == 41 and reading.energy_mj is not None
    assert len(reading.errors) == 1 and "power" in reading.errors[0]


def test_vgpu_license_follows_the_licensable_features(nvml) -> None:
    fake, backend, _ = nvml(dgx_a100())
    boards = fake.gpus
    boards[1].telemetry.grid_license_supported = True
    boards[2].telemetry.grid_license_supported = True
    boards[2].telemetry.vgpu_licensed = True
    boards[3].telemetry.grid_license_supported = None
    assert [backend.read_telemetry(i).vgpu_licensed for i in range(4)] == [
        False,
        False,
        True,
        None,
    ]


def test_a_driver_older_than_the_v2_calls_gets_the_v1_ones(nvml) -> None:
    fake, backend, _ = nvml(
        dgx_a100(absent={"nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetTemperatureV"})
    )
    reading = backend.read_telemetry(0)
    # v1 memory: used includes reserved and there is no reserved figure.
    assert (reading.fb_total_mib, reading.fb_used_mib, reading.fb_reserved_mib) == (
        40960,
        512,
        None,
    )
    assert reading.gpu_temp_c == 41
    assert reading.errors == ()
    before = sum(fake.calls.values())
    assert backend.read_telemetry(0).nvml_calls == sum(fake.calls.values()) - before


def test_a_lost_gpu_reads_as_lost_and_the_others_still_answer(nvml) -> None:
    fake, backend, _ = nvml(dgx_a100())
    backend.read_telemetry(4)
    fake.gpus[4].lost = True
    reading = backend.read_telemetry(4)
    assert reading.lost and reading.uuid == fake.gpus[4].uuid
    assert reading.power_w is None and reading.gpu_util_pct is None
    assert backend.read_telemetry(5).power_w == 254.321


def test_reads_need_an_open_backend_and_a_real_index(nvml) -> None:
    _, backend, _ = nvml(dgx_a100())
    with pytest.raises(HwError) as err:
        backend.read_telemetry(8)
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT
    backend.close()
    with pytest.raises(HwError) as err:
        backend.read_telemetry(0)
    assert err.value.kind is ErrorKind.UNINITIALIZED


# ---- NVML calls ---------------------------------------------------------------------------------


def calls_of(fake: FakeNvml, backend: NvmlBackend, index: int) -> tuple[int, int]:
    """The calls one read made as the backend counts them, and as the library saw them."""
    before = sum(fake.calls.values())
    reading = backend.read_telemetry(index)
    return reading.nvml_calls, sum(fake.calls.values()) - before


def test_a_whole_gpu_read_batches_the_fields_and_keeps_the_handle(nvml) -> None:
    fake, backend, _ = nvml(dgx_h100())
    first, seen = calls_of(fake, backend, 0)
    assert first == seen
    steady, seen = calls_of(fake, backend, 0)
    assert steady == seen
    # Fields (one call), SM and memory clocks, temperature, power, vGPU licensing, the MIG check,
    # utilization, encoder, decoder, memory, and a GPM sample plus its metrics.
    assert steady == 13
    assert fake.calls["nvmlDeviceGetFieldValues"] == 2
    assert fake.calls["nvmlDeviceGetHandleByIndex_v2"] == 1  # kept from the first read
    assert fake.calls["nvmlGpmQueryDeviceSupport"] == 1  # asked once per board


def test_counts_for_an_a100_without_gpm(nvml) -> None:
    fake, backend, _ = nvml(dgx_a100())
    calls_of(fake, backend, 0)
    assert calls_of(fake, backend, 0) == (11, 11)


# ---- MIG ----------------------------------------------------------------------------------------


def test_mig_h100_reads_each_instance_and_the_parents_shared_values(nvml) -> None:
    fake, backend, clock = nvml(dgx_h100())
    gi_ids = mig_h100(fake, backend)
    t = fake.gpus[0].telemetry
    t.instance_used_mib = {gi: 1000 * gi for gi in gi_ids}
    t.instance_gpm = {
        gi: {
            GPM_GRAPHICS_UTIL: 10.0 * gi,
            GPM_ANY_TENSOR_UTIL: 5.0 * gi,
            GPM_DRAM_BW_UTIL: 2.0 * gi,
        }
        for gi in gi_ids
    }
    first, second = read_twice(backend, clock)

    assert second.mig_enabled
    # Not supported in MIG mode: absent, never 0.
    assert second.gpu_util_pct is None and second.mem_copy_util_pct is None
    assert second.enc_util_pct is None and second.dec_util_pct is None
    # With instances: no remapped rows, and no whole-GPU memory or activity.
    assert second.remapped_rows_correctable is None and second.row_remap_failure is None
    assert second.fb_used_mib is None and second.gr_engine_active_ratio is None
    # The parent's values, repeated on every instance's row above.
    assert (second.sm_clock_mhz, second.gpu_temp_c, second.power_w) == (1980, 52, 512.345)
    assert second.energy_mj == t.energy_mj
    assert second.pcie_tx_bytes_per_s == 1536.0 * 2**20
    assert second.errors == ()

    assert [m.gi_id for m in second.instances] == sorted(gi_ids)
    for mig in second.instances:
        assert (mig.fb_total_mib, mig.fb_used_mib, mig.fb_reserved_mib) == (
            9984,
            1000 * mig.gi_id,
            6,
        )
        assert mig.fb_free_mib == 9984 - 1000 * mig.gi_id - 6
        assert mig.gr_engine_active_ratio == pytest.approx(0.1 * mig.gi_id)
        assert mig.tensor_active_ratio == pytest.approx(0.05 * mig.gi_id)
        assert mig.dram_active_ratio == pytest.approx(0.02 * mig.gi_id)
    assert all(m.gr_engine_active_ratio is None for m in first.instances)


def test_mig_read_calls_for_seven_instances(nvml) -> None:
    fake, backend, _ = nvml(dgx_h100())
    mig_h100(fake, backend)
    calls_of(fake, backend, 0)
    calls_of(fake, backend, 0)
    steady, seen = calls_of(fake, backend, 0)
    assert steady == seen
    # Fields, 2 clocks, temperature, power, licensing, the MIG check; the parent's GPM sample and
    # metrics (PCIe); per instance its memory, GPM sample and metrics. The MIG devices are looked
    # up once per layout, not per read.
    assert steady == 7 + 2 + 7 * 3
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 0  # not asked where NVML refuses it


def test_a_layout_change_starts_the_instances_rates_over_and_frees_their_samples(nvml) -> None:
    fake, backend, clock = nvml(dgx_h100())
    gi_ids = mig_h100(fake, backend, count=2)
    fake.gpus[0].telemetry.instance_gpm = {gi: {GPM_GRAPHICS_UTIL: 50.0} for gi in gi_ids}
    read_twice(backend, clock)
    assert len(fake.gpm_samples) == 2 * 3  # the GPU and two instances

    # Destroy one instance and create another, which gets the same GI ID.
    backend.destroy_compute_instance(0, gi_ids[1], 0)
    backend.destroy_gpu_instance(0, gi_ids[1])
    gi = backend.create_gpu_instance(0, H100_1G_10GB, Placement(5, 1))
    backend.create_compute_instance(0, gi.gi_id, FULL_CI)
    assert gi.gi_id == gi_ids[1]
    fake.gpus[0].telemetry.instance_gpm[gi.gi_id] = {GPM_GRAPHICS_UTIL: 50.0}

    after = backend.read_telemetry(0)
    assert [m.gr_engine_active_ratio for m in after.instances] == [None, None]
    clock.now += 15.0
    again = backend.read_telemetry(0)
    assert [m.gr_engine_active_ratio for m in again.instances] == [0.5, 0.5]
    assert len(fake.gpm_samples) == 2 * 3

    backend.destroy_compute_instance(0, gi.gi_id, 0)
    backend.destroy_gpu_instance(0, gi.gi_id)
    backend.read_telemetry(0)
    assert len(fake.gpm_samples) == 2 * 2  # the gone instance's samples are freed
    backend.close()
    assert fake.gpm_samples == {}  # and all of them before NVML shuts down


def test_mig_on_without_instances_is_one_whole_gpu_row(nvml) -> None:
    fake, backend, _ = nvml(dgx_a100())
    fake.gpus[0].mig = (MIG_ENABLE, MIG_ENABLE)
    reading = backend.read_telemetry(0)
    assert reading.mig_enabled and reading.instances == ()
    assert reading.gpu_util_pct is None  # MIG on: not supported
    assert reading.fb_used_mib == 20480 and reading.remapped_rows_correctable == 2


def test_mig_a100_has_instance_memory_but_no_gpm(nvml) -> None:
    fake, backend, clock = nvml(dgx_a100())
    fake.gpus[0].mig = (MIG_ENABLE, MIG_ENABLE)
    for slot in range(7):
        gi = backend.create_gpu_instance(0, H100_1G_10GB, Placement(slot, 1))  # 1g.5gb here
        backend.create_compute_instance(0, gi.gi_id, FULL_CI)
    _, second = read_twice(backend, clock)
    assert len(second.instances) == 7
    assert {m.fb_total_mib for m in second.instances} == {4864}
    assert all(m.gr_engine_active_ratio is None for m in second.instances)
    assert second.pcie_tx_bytes_per_s is None


def test_concurrent_reads_agree_and_keep_two_samples_per_gpu(nvml) -> None:
    fake, backend, _ = nvml(dgx_h100())
    failures: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(20):
                for index in range(8):
                    reading = backend.read_telemetry(index)
                    assert reading.errors == () and reading.power_w == 512.345
        except BaseException as exc:  # reported below, with the thread's own traceback
            failures.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert fake.internal_errors == []
    assert len(fake.gpm_samples) == 2 * 8


def test_the_fake_checks_gpm_requests_as_nvml_does(nvml) -> None:
    """Guards the fake itself: a metrics request across two GPUs' samples is refused."""
    nvml(dgx_h100())  # installed and open
    first, second = pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()
    pynvml.nvmlGpmSampleGet(pynvml.nvmlDeviceGetHandleByIndex(0), first)
    pynvml.nvmlGpmSampleGet(pynvml.nvmlDeviceGetHandleByIndex(1), second)
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 1
    request.sample1, request.sample2 = first, second
    request.metrics[0].metricId = GPM_GRAPHICS_UTIL
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlGpmMetricsGet(request)
    pynvml.nvmlGpmSampleFree(first)
    pynvml.nvmlGpmSampleFree(second)
