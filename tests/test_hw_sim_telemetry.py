"""Telemetry of the simulated backend: values that move, follow the load, keep their counters
across changes and restarts, and are absent where the real board has nothing to report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.hw.backend import Backend, LoadSimulator
from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.sim.backend import SimBackend
from gpud.hw.sim.telemetry import BOARDS, LAG_S
from gpud.hw.telemetry import GpuReading
from gpud.hw.types import Placement

START = 1_800_000_000.0
P1G = 19  # 1g.5gb on A100 40GB, 1g.10gb on H100 80GB
P3G = 9


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def opened(spec: str, state_dir: Path, clock: Clock) -> SimBackend:
    backend = SimBackend(spec, state_dir, clock=clock)
    backend.open()
    return backend


def refused(kind: ErrorKind, call) -> str:
    with pytest.raises(HwError) as err:
        call()
    assert err.value.kind is kind, err.value
    return str(err.value)


def with_mig(backend: SimBackend, index: int, profile: int, count: int) -> list[int]:
    """MIG on (power cycling for Ampere's pending mode), then ``count`` GIs of ``profile``."""
    backend.set_mig_mode(index, True)
    if backend.mig_state(index).mode.current.value != "enabled":
        backend.reset_gpu(index)
    state = backend.mig_state(index)
    chosen = next(p for p in state.profiles if p.profile_id == profile)
    made = []
    for placement in chosen.placements[:count]:
        gi = backend.create_gpu_instance(index, profile, placement)
        assert chosen.full_ci is not None
        backend.create_compute_instance(index, gi.gi_id, chosen.full_ci.profile_id)
        made.append(gi.gi_id)
    return made


def readings(backend: SimBackend, clock: Clock, index: int, every_s: float, n: int) -> list:
    found = []
    for _ in range(n):
        found.append(backend.read_telemetry(index))
        clock.now += every_s
    return found


def test_both_protocols() -> None:
    backend = SimBackend("t4x1", Path("/nonexistent"))
    assert isinstance(backend, Backend) and isinstance(backend, LoadSimulator)


# ---- per product --------------------------------------------------------------------------------


def test_dgx_h100_serves_gpm_after_two_reads(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-h100", tmp_path, clock)
    first, second = readings(backend, clock, 3, 15.0, 2)
    assert first.gr_engine_active_ratio is None and first.nvlink_bandwidth_mb_per_s is None
    assert 0.0 < second.gr_engine_active_ratio <= 1.0  # type: ignore[operator]
    assert second.tensor_active_ratio is not None and second.dram_active_ratio is not None
    assert second.pcie_tx_bytes_per_s is not None and second.pcie_tx_bytes_per_s > 0
    assert second.nvlink_bandwidth_mb_per_s is not None and second.nvlink_bandwidth_mb_per_s > 0
    assert second.memory_temp_c is not None
    assert (second.fb_total_mib, second.fb_reserved_mib) == (
        81559,
        BOARDS["h100-80gb"].reserved_mib,
    )
    assert second.fb_total_mib == (
        second.fb_free_mib + second.fb_used_mib + second.fb_reserved_mib  # type: ignore[operator]
    )
    assert second.nvml_calls == 0


def test_dgx_a100_has_no_gpm_ever(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    for reading in readings(backend, clock, 0, 15.0, 3):
        assert reading.gr_engine_active_ratio is None
        assert reading.tensor_active_ratio is None
        assert reading.dram_active_ratio is None
        assert reading.pcie_tx_bytes_per_s is None
        assert reading.gpu_util_pct is not None and reading.remapped_rows_correctable == 0
    assert reading.nvlink_bandwidth_mb_per_s is not None


@pytest.mark.parametrize(
    ("spec", "memory_temp", "remapped", "nvlink"),
    [
        ("t4x1", False, False, False),  # Turing, GDDR6, PCIe
        ("l4x2", False, True, False),  # Ada, GDDR6, PCIe
        ("a30x4", True, True, True),  # Ampere, HBM2, NVLink bridges
        ("h100-80gb:1", True, True, False),  # alone: no NVLink peer
    ],
)
def test_what_each_board_reports(
    tmp_path: Path, spec: str, memory_temp: bool, remapped: bool, nvlink: bool
) -> None:
    clock = Clock()
    _, second = readings(opened(spec, tmp_path, clock), clock, 0, 15.0, 2)
    assert (second.memory_temp_c is not None) is memory_temp
    assert (second.remapped_rows_correctable is not None) is remapped
    assert (second.row_remap_failure is not None) is remapped
    assert (second.nvlink_bandwidth_mb_per_s is not None) is nvlink
    assert (second.gr_engine_active_ratio is not None) is spec.startswith("h100")
    assert second.gpu_util_pct is not None and second.enc_util_pct == 0


# ---- movement -----------------------------------------------------------------------------------


def test_values_move_within_the_boards_range(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    board = BOARDS["a100-40gb"]
    seen = readings(backend, clock, 5, 20.0, 60)  # twenty minutes
    util = [r.gpu_util_pct for r in seen]
    assert min(util) <= 20 and max(util) >= 80  # the moving pattern swings 10-90 %
    assert all(0 <= u <= 100 for u in util)
    assert len({r.gpu_temp_c for r in seen}) > 5
    assert all(board.temp_idle_c <= r.gpu_temp_c <= board.temp_max_c for r in seen)
    assert all(board.power_idle_w <= r.power_w <= board.power_max_w for r in seen)
    assert all(board.sm_clock_idle_mhz <= r.sm_clock_mhz <= board.sm_clock_max_mhz for r in seen)
    assert len({r.fb_used_mib for r in seen}) > 5
    energy = [r.energy_mj for r in seen]
    assert energy == sorted(energy) and energy[-1] > energy[0]
    # The GPUs of one machine do not move in step.
    other = readings(backend, clock, 6, 20.0, 1)[0]
    assert other.gpu_util_pct != backend.read_telemetry(5).gpu_util_pct


def test_the_same_time_and_load_read_the_same(tmp_path: Path) -> None:
    clock = Clock()
    first = opened("dgx-h100", tmp_path, clock)
    clock.now += 123.0
    a = first.read_telemetry(2)
    second = SimBackend("dgx-h100", tmp_path, clock=clock)  # the same state file
    second.open()
    assert second.read_telemetry(2) == a


def test_energy_is_the_integral_of_power(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("t4x1", tmp_path, clock)
    backend.set_load(0, utilization_pct=50)
    before = backend.read_telemetry(0)
    clock.now += 100.0
    after = backend.read_telemetry(0)
    board = BOARDS["t4"]
    middle = board.power_idle_w + (board.power_max_w - board.power_idle_w) * 0.5
    # Within the +-2 point swing of a set load.
    assert after.energy_mj - before.energy_mj == pytest.approx(100 * middle * 1000, rel=0.02)


# ---- set-load -----------------------------------------------------------------------------------


def test_a_set_load_holds_and_temperature_follows_it_with_a_lag(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-h100", tmp_path, clock)
    board = BOARDS["h100-80gb"]
    backend.set_load(1, utilization_pct=0, memory_used_mib=0)
    clock.now += 10 * LAG_S  # long idle: at idle temperature
    idle = backend.read_telemetry(1)
    assert (idle.gpu_util_pct, idle.fb_used_mib) == (0, 0)
    assert idle.gpu_temp_c == round(board.temp_idle_c)
    assert idle.power_w == board.power_idle_w

    assert backend.set_load(1, utilization_pct=100, memory_used_mib=70_000) == (
        "utilization 100%, memory used 70000 MiB"
    )
    at_once = backend.read_telemetry(1)
    assert (at_once.gpu_util_pct, at_once.fb_used_mib) == (100, 70_000)
    assert at_once.power_w == board.power_max_w  # power follows at once
    assert at_once.sm_clock_mhz == board.sm_clock_max_mhz
    temps = [at_once.gpu_temp_c]
    for _ in range(6):
        clock.now += LAG_S / 2
        temps.append(backend.read_telemetry(1).gpu_temp_c)
    assert temps == sorted(temps) and temps[0] < temps[1] < temps[3]  # rises, not jumps
    assert temps[-1] >= board.temp_max_c - 2
    clock.now += 30.0
    busy = backend.read_telemetry(1)
    assert busy.gr_engine_active_ratio == pytest.approx(1.0)

    backend.set_load(1, utilization_pct=80)  # memory keeps its setting
    for reading in readings(backend, clock, 1, 7.0, 20):
        assert 78 <= reading.gpu_util_pct <= 82  # type: ignore[operator]
        assert reading.fb_used_mib == 70_000
    assert backend.set_load(1, automatic=True) == "utilization moving, memory used moving"


def test_set_load_is_kept_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    backend.set_load(4, utilization_pct=33, memory_used_mib=12_345)
    clock.now += 60
    before = backend.read_telemetry(4)
    backend.close()

    again = opened("dgx-a100", tmp_path, clock)
    after = again.read_telemetry(4)
    assert after == before  # same time, same load: the same reading
    document = json.loads(again.state_path.read_text())
    assert document["gpus"][4]["load"]["whole"] == {
        "utilization_pct": 33,
        "memory_used_mib": 12_345,
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((8,), {"utilization_pct": 5}, "no GPU with index 8"),
        ((0,), {"utilization_pct": 100.5}, "0 to 100"),
        ((0,), {"utilization_pct": -1}, "0 to 100"),
        ((0,), {"utilization_pct": float("nan")}, "0 to 100"),
        ((0,), {"memory_used_mib": 40_960}, "0-40381 MiB"),
        ((0,), {"memory_used_mib": -5}, "0-40381 MiB"),
        ((0,), {}, "nothing to set"),
        ((0, 1), {"utilization_pct": 5}, "no GPU instance 1: MIG is disabled"),
    ],
)
def test_bad_loads_are_refused_and_change_nothing(tmp_path: Path, args, kwargs, words) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    before = backend.state_path.read_bytes()
    message = refused(ErrorKind.INVALID_ARGUMENT, lambda: backend.set_load(*args, **kwargs))
    assert words in message
    assert backend.state_path.read_bytes() == before


def test_a_lost_gpu_takes_no_load_and_reads_as_lost(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    backend.inject_gpu_lost(2)
    refused(ErrorKind.GPU_IS_LOST, lambda: backend.set_load(2, utilization_pct=50))
    reading = backend.read_telemetry(2)
    assert reading == GpuReading(2, reading.uuid, lost=True)


# ---- MIG ----------------------------------------------------------------------------------------


def test_mig_instances_run_their_own_load(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-h100", tmp_path, clock)
    gi_ids = with_mig(backend, 0, P1G, 7)
    message = refused(ErrorKind.INVALID_ARGUMENT, lambda: backend.set_load(0, utilization_pct=9))
    assert "MIG mode" in message and "--gi" in message
    refused(ErrorKind.INVALID_ARGUMENT, lambda: backend.set_load(0, 99, utilization_pct=9))
    refused(
        ErrorKind.INVALID_ARGUMENT, lambda: backend.set_load(0, gi_ids[0], memory_used_mib=9984)
    )

    for gi in gi_ids:
        backend.set_load(0, gi, utilization_pct=0, memory_used_mib=0)
    backend.set_load(0, gi_ids[2], utilization_pct=100, memory_used_mib=5000)
    first, second = readings(backend, clock, 0, 30.0, 2)
    assert second.mig_enabled
    assert second.gpu_util_pct is None and second.enc_util_pct is None  # absent in MIG mode
    assert second.fb_used_mib is None and second.remapped_rows_correctable is None
    assert [m.gi_id for m in second.instances] == sorted(gi_ids)
    busy = second.instance(gi_ids[2])
    assert busy is not None and busy.fb_used_mib == 5000 and busy.fb_total_mib == 9984
    assert busy.gr_engine_active_ratio == pytest.approx(1.0)
    idle = second.instance(gi_ids[0])
    assert idle is not None and idle.fb_used_mib == 0 and idle.gr_engine_active_ratio == 0.0
    assert all(m.gr_engine_active_ratio is None for m in first.instances)
    # The parent draws power for one busy slice of seven.
    board = BOARDS["h100-80gb"]
    share = board.power_idle_w + (board.power_max_w - board.power_idle_w) / 7
    assert second.power_w == pytest.approx(share, abs=0.2 * (board.power_max_w / 7))
    assert second.pcie_tx_bytes_per_s is not None  # the parent's, repeated on every row


def test_a100_mig_instances_have_memory_but_no_gpm(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    gi_ids = with_mig(backend, 1, P3G, 2)
    _, second = readings(backend, clock, 1, 15.0, 2)
    assert [m.gi_id for m in second.instances] == sorted(gi_ids)
    assert all(m.fb_total_mib == 19968 for m in second.instances)
    assert all(m.gr_engine_active_ratio is None for m in second.instances)


def test_instance_loads_go_with_their_instance(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-h100", tmp_path, clock)
    gi_ids = with_mig(backend, 0, P1G, 2)
    backend.set_load(0, gi_ids[1], memory_used_mib=4000)
    backend.destroy_compute_instance(0, gi_ids[1], 0)
    backend.destroy_gpu_instance(0, gi_ids[1])
    document = json.loads(backend.state_path.read_text())
    assert document["gpus"][0]["load"]["instances"] == []
    assert [m.gi_id for m in backend.read_telemetry(0).instances] == [gi_ids[0]]


# ---- counters -----------------------------------------------------------------------------------


def test_old_state_counts_from_when_it_was_written_and_is_not_rewritten(tmp_path: Path) -> None:
    clock = Clock()
    path = opened("t4x1", tmp_path, clock).state_path
    document = json.loads(path.read_text())
    document["version"] = 2
    for gpu in document["gpus"]:
        del gpu["load"]
    path.write_text(json.dumps(document))
    written = START - 3600.0
    os.utime(path, (written, written))

    reading = opened("t4x1", tmp_path, clock).read_telemetry(0)
    board = BOARDS["t4"]
    assert 3600 * board.power_idle_w * 1000 <= reading.energy_mj <= 3600 * board.power_max_w * 1000
    assert opened("t4x1", tmp_path, clock).read_telemetry(0) == reading
    assert json.loads(path.read_text()) == document  # reading alone rewrites nothing


def test_a_power_cycle_restarts_the_counters(tmp_path: Path) -> None:
    clock = Clock()
    backend = opened("dgx-a100", tmp_path, clock)
    backend.set_load(0, utilization_pct=70)
    clock.now += 600
    assert backend.read_telemetry(0).energy_mj > 0
    backend.power_cycle()
    after = backend.read_telemetry(0)
    assert after.energy_mj < 1000  # a freshly loaded driver, a few ms at most
    assert 68 <= after.gpu_util_pct <= 72  # type: ignore[operator]


CHANGES = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=900.0),
        st.sampled_from(["read", "load", "auto", "mig", "restart"]),
        st.integers(min_value=0, max_value=100),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(changes=CHANGES)
def test_energy_never_runs_back(changes) -> None:
    """Whatever loads, layouts and restarts come, and in whatever order, the energy counter only
    grows, and the NVLink rate is never negative."""
    import tempfile

    with tempfile.TemporaryDirectory() as state_dir:
        clock = Clock()
        backend = opened("dgx-h100", Path(state_dir), clock)
        last = backend.read_telemetry(0).energy_mj
        gi_ids: list[int] = []
        for step_s, change, value in changes:
            clock.now += step_s
            if change == "load" and not gi_ids:
                backend.set_load(0, utilization_pct=value, memory_used_mib=value * 100)
            elif change == "load":
                backend.set_load(0, gi_ids[value % len(gi_ids)], utilization_pct=value)
            elif change == "auto" and not gi_ids:
                backend.set_load(0, automatic=True)
            elif change == "mig" and not gi_ids:
                gi_ids = with_mig(backend, 0, P1G, 1 + value % 7)
            elif change == "mig":
                for gi in gi_ids:
                    backend.destroy_compute_instance(0, gi, 0)
                    backend.destroy_gpu_instance(0, gi)
                backend.set_mig_mode(0, False)  # Hopper: at once
                gi_ids = []
            elif change == "restart":
                backend.close()
                backend = opened("dgx-h100", Path(state_dir), clock)
            reading = backend.read_telemetry(0)
            assert reading.energy_mj >= last  # type: ignore[operator]
            assert (reading.nvlink_bandwidth_mb_per_s or 0.0) >= 0.0
            last = reading.energy_mj


def test_placements_used_by_the_tests_exist(tmp_path: Path) -> None:
    """Guards with_mig: the first placements of the profiles used are the expected ones."""
    backend = opened("dgx-a100", tmp_path, Clock())
    backend.set_mig_mode(0, True)
    backend.reset_gpu(0)
    profile = next(p for p in backend.mig_state(0).profiles if p.profile_id == P3G)
    assert profile.placements[:2] == (Placement(0, 4), Placement(4, 4))
