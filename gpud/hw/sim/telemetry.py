"""What the simulated GPUs' sensors and counters read: plausible, moving, and a pure function of
the time and the load.

Each GPU (MIG off) or GPU instance (MIG on) runs a load whose utilization is a slow wave,
``a + b·sin(ωt + φ)``: the built-in pattern swings between 10 and 90 % over a few minutes, a load
set with ``gpudctl debug set-load`` holds its value within ±2 points. A MIG-enabled GPU's own
utilization is its instances' weighted by their compute slices. Everything else follows from
that, in closed form, so that a reading needs no thread and no history:

* power follows utilization at once (idle to board power), and the energy counter is its
  integral, so it only ever grows;
* temperature follows utilization through a first-order lag of one minute (:data:`LAG_S`);
* SM clock boosts with load, memory clock is the board's; memory used follows the load (or is
  what was set), free and reserved as NVML v2 reports them;
* NVLink throughput counters and the GPM figures (graphics, tensor, DRAM activity, PCIe) are
  integrals of utilization too; rates between two reads are what NVML's would be.

What a board lacks is absent, as on the real board (shared/reference/cluster-integration.md):
GPM only on Hopper (H100, H200); memory temperature only on HBM boards; row remapping from Ampere
on; NVLink only where the machine has links; utilization, encoder and decoder not while MIG is on.

A change of load or of the MIG layout (and a power cycle) starts a new :class:`Checkpoint`, which
records the counters at that moment, so the counters stay continuous and monotonic across it and
across a gpud restart (the checkpoint is kept in the machine's state file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from gpud.hw.telemetry import (
    MIB,
    CounterSample,
    GpuReading,
    MigReading,
    counter_rate,
    nvlink_mb_per_s,
)
from gpud.hw.types import GiProfile, GpuInstance, MigMode, MigState
from gpud.mig.catalog import Family

LAG_S = 60.0
"""Time constant of the temperature's lag behind utilization."""

MIG_RESERVED_MIB = 6
"""What a MIG device reports as reserved: a few MiB of its instance's memory."""

_SET_SWING_PCT = 2.0  # a set load wanders this far around its value


@dataclass(frozen=True, slots=True)
class Board:
    """How one board type behaves, in NVML's terms.

    ``nvlink_kib_per_s`` and ``pcie_mib_per_s`` are the traffic, per direction, at full load.
    """

    sm_clock_idle_mhz: int
    sm_clock_max_mhz: int
    mem_clock_mhz: int
    power_idle_w: float
    power_max_w: float
    temp_idle_c: float
    temp_max_c: float
    reserved_mib: int
    memory_temp: bool
    gpm: bool
    remapped_rows: bool
    nvlink_kib_per_s: float
    pcie_mib_per_s: float


_GEN4_X16 = 24_000.0
_GEN5_X16 = 48_000.0

BOARDS: Mapping[str, Board] = {
    "a100-40gb": Board(210, 1410, 1215, 55, 400, 31, 71, 579, True, False, True, 8.0e7, _GEN4_X16),
    "a100-80gb": Board(210, 1410, 1593, 60, 400, 31, 71, 643, True, False, True, 8.0e7, _GEN4_X16),
    "h100-80gb": Board(345, 1980, 2619, 72, 700, 29, 74, 612, True, True, True, 1.2e8, _GEN5_X16),
    "h200": Board(345, 1980, 3201, 76, 700, 29, 73, 674, True, True, True, 1.2e8, _GEN5_X16),
    "a30": Board(210, 1440, 1215, 31, 165, 30, 69, 312, True, False, True, 2.6e7, _GEN4_X16),
    "l4": Board(210, 2040, 6251, 16, 72, 34, 75, 280, False, False, True, 0, _GEN4_X16),
    "t4": Board(300, 1590, 5000, 10, 70, 34, 70, 250, False, False, False, 0, 12_000.0),
}
"""Keyed like :data:`gpud.hw.sim.machines.MODELS`; figures near the real boards' (idle and
maximum board power, boost clocks, HBM or GDDR memory clock)."""


# ---- what a GPU remembers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """What ``set-load`` asked of a GPU or GPU instance; None: the built-in moving pattern."""

    utilization_pct: float | None = None
    memory_used_mib: int | None = None

    def describe(self) -> str:
        util = "moving" if self.utilization_pct is None else f"{self.utilization_pct:g}%"
        memory = "moving" if self.memory_used_mib is None else f"{self.memory_used_mib} MiB"
        return f"utilization {util}, memory used {memory}"


AUTOMATIC = Load()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The counters of one GPU at ``at_s`` (wall clock), from which later values are computed.

    ``activity`` is the integral of the GPU's utilization (percent-seconds) since its counters
    started, ``instance_activity`` the same per GPU instance; ``lag_pct`` is the lagged
    utilization the temperature follows.
    """

    at_s: float
    energy_mj: float = 0.0
    activity: float = 0.0
    lag_pct: float = 0.0
    instance_activity: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class GpuLoad:
    """A simulated GPU's load settings and the checkpoint of its counters; kept in the state
    file. ``instances`` holds the settings of GPU instances that have one, by GI ID."""

    checkpoint: Checkpoint
    whole: Load = AUTOMATIC
    instances: tuple[tuple[int, Load], ...] = ()

    def of(self, gi_id: int | None) -> Load:
        if gi_id is None:
            return self.whole
        return dict(self.instances).get(gi_id, AUTOMATIC)


def fresh(at_s: float) -> GpuLoad:
    """A GPU whose counters start at ``at_s`` (its driver loaded then), under the moving pattern."""
    return GpuLoad(Checkpoint(at_s))


# ---- the waves ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wave:
    """Utilization ``mean + swing·sin(ω t + φ)`` in percent; never leaves 0-100."""

    mean: float
    swing: float
    omega: float
    phase: float

    def at(self, t: float) -> float:
        return self.mean + self.swing * math.sin(self.omega * t + self.phase)

    def integral(self, t0: float, t1: float) -> float:
        return self.mean * (t1 - t0) + self.swing / self.omega * (
            math.cos(self.omega * t0 + self.phase) - math.cos(self.omega * t1 + self.phase)
        )

    def lagged(self, t: float) -> float:
        """The steady response of a first-order lag of :data:`LAG_S` to this wave."""
        wt = self.omega * LAG_S
        return self.mean + self.swing / math.hypot(1.0, wt) * math.sin(
            self.omega * t + self.phase - math.atan(wt)
        )


def wave(load: Load, index: int, gi_id: int | None) -> Wave:
    """The utilization of GPU ``index`` (or its instance ``gi_id``) under ``load``; GPUs and
    instances get their own period and phase, so a machine's GPUs do not move in step."""
    gi = 0 if gi_id is None else gi_id
    phase = 0.9 * index + 1.7 * gi
    if load.utilization_pct is None:
        period = 300.0 + 47.0 * index + 29.0 * gi
        return Wave(50.0, 40.0, 2 * math.pi / period, phase)
    value = load.utilization_pct
    swing = min(_SET_SWING_PCT, value, 100.0 - value)
    return Wave(value, swing, 2 * math.pi / (60.0 + 7.0 * index + 3.0 * gi), phase)


@dataclass(frozen=True, slots=True)
class Part:
    """A GPU (MIG off) or one of its GPU instances: its share of the GPU's compute, its wave,
    and the memory it has."""

    gi_id: int | None
    weight: float
    wave: Wave
    load: Load
    memory_mib: int
    reserved_mib: int


def gi_memory_mib(family: Family, profile: GiProfile) -> int:
    """The instance's memory; where the catalog has none (A100-80GB 1g.20gb), that of a profile
    with as many memory slices, as the driver reports for the other boards."""
    if profile.memory_mib:
        return profile.memory_mib
    return next(
        (p.memory_mib for p in family.profiles if p.memory_slices == profile.memory_slices),
        0,
    )


def parts(
    index: int,
    memory_mib: int,
    board: Board,
    mig: MigState,
    instances: tuple[GpuInstance, ...],
    family: Family | None,
    load: GpuLoad,
) -> tuple[Part, ...]:
    """What runs on the GPU: the whole GPU, or (MIG on) each GPU instance; none for a MIG GPU
    without instances, which then idles."""
    if mig.current is not MigMode.ENABLED or family is None:
        whole = load.whole
        return (Part(None, 1.0, wave(whole, index, None), whole, memory_mib, board.reserved_mib),)
    profiles = {p.profile_id: p for p in family.profiles}
    found = []
    for gi in instances:
        profile = profiles[gi.profile_id]
        setting = load.of(gi.gi_id)
        found.append(
            Part(
                gi.gi_id,
                profile.slices / family.compute_slices,
                wave(setting, index, gi.gi_id),
                setting,
                gi_memory_mib(family, profile),
                MIG_RESERVED_MIB,
            )
        )
    return tuple(found)


# ---- values at a time --------------------------------------------------------------------------


def utilization(gpu_parts: tuple[Part, ...], t: float) -> float:
    return sum(p.weight * p.wave.at(t) for p in gpu_parts)


def activity(gpu_parts: tuple[Part, ...], checkpoint: Checkpoint, t: float) -> float:
    """The GPU's utilization integrated since its counters started (percent-seconds)."""
    return checkpoint.activity + sum(
        p.weight * p.wave.integral(checkpoint.at_s, t) for p in gpu_parts
    )


def instance_activity(part: Part, checkpoint: Checkpoint, t: float) -> float:
    """A GPU instance's utilization integrated since it was created (percent-seconds)."""
    base = (
        dict(checkpoint.instance_activity).get(part.gi_id, 0.0) if part.gi_id is not None else 0.0
    )
    return base + part.wave.integral(checkpoint.at_s, t)


def lagged(gpu_parts: tuple[Part, ...], checkpoint: Checkpoint, t: float) -> float:
    """The lagged utilization: the waves' steady responses plus what remains of the value at the
    checkpoint, decaying with :data:`LAG_S`."""
    steady = sum(p.weight * p.wave.lagged(t) for p in gpu_parts)
    steady_then = sum(p.weight * p.wave.lagged(checkpoint.at_s) for p in gpu_parts)
    decay = math.exp(-(t - checkpoint.at_s) / LAG_S)
    return steady + (checkpoint.lag_pct - steady_then) * decay


def energy_mj(board: Board, gpu_parts: tuple[Part, ...], checkpoint: Checkpoint, t: float) -> float:
    span = board.power_max_w - board.power_idle_w
    busy = activity(gpu_parts, checkpoint, t) - checkpoint.activity
    joules = board.power_idle_w * (t - checkpoint.at_s) + span * busy / 100.0
    return checkpoint.energy_mj + 1000.0 * joules


def checkpoint_at(
    board: Board, gpu_parts: tuple[Part, ...], checkpoint: Checkpoint, t: float
) -> Checkpoint:
    """The counters at ``t`` as a new checkpoint, before the load or layout changes."""
    t = max(t, checkpoint.at_s)  # a wall clock set back must not run the counters back
    return Checkpoint(
        at_s=t,
        energy_mj=energy_mj(board, gpu_parts, checkpoint, t),
        activity=activity(gpu_parts, checkpoint, t),
        lag_pct=lagged(gpu_parts, checkpoint, t),
        instance_activity=tuple(
            (p.gi_id, instance_activity(p, checkpoint, t)) for p in gpu_parts if p.gi_id is not None
        ),
    )


def load_problems(load: Load, part: Part) -> list[str]:
    """Why ``load`` cannot run on ``part``; empty when it can."""
    what = "the GPU" if part.gi_id is None else f"GPU instance {part.gi_id}"
    problems = []
    util = load.utilization_pct
    if util is not None and not (
        isinstance(util, (int, float)) and not isinstance(util, bool) and 0 <= util <= 100
    ):
        problems.append(f"utilization must be a percentage from 0 to 100, got {util!r}")
    memory = load.memory_used_mib
    available = part.memory_mib - part.reserved_mib
    if memory is not None and not (
        isinstance(memory, int) and not isinstance(memory, bool) and 0 <= memory <= available
    ):
        problems.append(
            f"memory used must be 0-{available} MiB on {what} "
            f"({part.memory_mib} MiB, {part.reserved_mib} reserved), got {memory!r}"
        )
    return problems


def memory_used_mib(part: Part, t: float) -> int:
    available = part.memory_mib - part.reserved_mib
    if part.load.memory_used_mib is not None:
        return part.load.memory_used_mib
    return round(available * (0.1 + 0.7 * part.wave.at(t) / 100.0))


# ---- samples and readings ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One read: the reading without its rates, and the cumulative counters the next read's
    rates come from."""

    at_s: float
    reading: GpuReading
    activity: float
    instance_activity: tuple[tuple[int, float], ...] = ()
    nvlink_kib: float | None = None


def _nvlink_kib_per_pct_s(board: Board) -> float:
    """KiB moved over NVLink per percent-second of utilization, both directions together."""
    return (0.30 + 0.32) * board.nvlink_kib_per_s / 100.0


def _memory(part: Part, t: float) -> dict[str, int]:
    used = memory_used_mib(part, t)
    return {
        "fb_total_mib": part.memory_mib,
        "fb_used_mib": used,
        "fb_reserved_mib": part.reserved_mib,
        "fb_free_mib": part.memory_mib - part.reserved_mib - used,
    }


def sample(
    index: int,
    uuid: str,
    board: Board,
    memory_mib: int,
    nvlink: bool,
    mig_enabled: bool,
    gpu_parts: tuple[Part, ...],
    checkpoint: Checkpoint,
    t: float,
) -> Sample:
    """GPU ``index`` at ``t``: ``gpu_parts`` are what :func:`parts` gives for it, ``nvlink``
    whether its machine wires NVLinks to it."""
    t = max(t, checkpoint.at_s)
    util = utilization(gpu_parts, t)
    temp = round(
        board.temp_idle_c
        + (board.temp_max_c - board.temp_idle_c) * lagged(gpu_parts, checkpoint, t) / 100.0
    )
    boost = min(1.0, util / 25.0)
    sm_span = board.sm_clock_max_mhz - board.sm_clock_idle_mhz
    power_span = board.power_max_w - board.power_idle_w
    values: dict[str, Any] = {
        "sm_clock_mhz": round(board.sm_clock_idle_mhz + sm_span * boost),
        "mem_clock_mhz": board.mem_clock_mhz,
        "gpu_temp_c": temp,
        "memory_temp_c": temp + 6 if board.memory_temp else None,
        "power_w": round(board.power_idle_w + power_span * util / 100.0, 3),
        "energy_mj": int(energy_mj(board, gpu_parts, checkpoint, t)),
        "pcie_replay_count": 0,
        "vgpu_licensed": False,
    }
    instances = tuple(
        MigReading(p.gi_id, **_memory(p, t)) for p in gpu_parts if p.gi_id is not None
    )
    if board.remapped_rows and not instances:  # NVML refuses these while instances exist
        values.update(
            remapped_rows_correctable=0, remapped_rows_uncorrectable=0, row_remap_failure=False
        )
    if not mig_enabled:
        values.update(
            gpu_util_pct=round(util),
            mem_copy_util_pct=round(0.45 * util),
            enc_util_pct=0,
            dec_util_pct=0,
            **_memory(gpu_parts[0], t),
        )
    elif not instances:  # MIG on, nothing created: the whole GPU, idle
        values.update(
            fb_total_mib=memory_mib,
            fb_used_mib=0,
            fb_reserved_mib=board.reserved_mib,
            fb_free_mib=memory_mib - board.reserved_mib,
        )
    total = activity(gpu_parts, checkpoint, t)
    return Sample(
        at_s=t,
        reading=GpuReading(index, uuid, mig_enabled=mig_enabled, instances=instances, **values),
        activity=total,
        instance_activity=tuple(
            (p.gi_id, instance_activity(p, checkpoint, t)) for p in gpu_parts if p.gi_id is not None
        ),
        nvlink_kib=_nvlink_kib_per_pct_s(board) * total if nvlink else None,
    )


def _gpm(average_pct: float | None) -> dict[str, float | None]:
    """The DCGM_FI_PROF_* ratios for an average utilization over the interval between reads."""
    if average_pct is None:
        return {
            "gr_engine_active_ratio": None,
            "tensor_active_ratio": None,
            "dram_active_ratio": None,
        }
    ratio = average_pct / 100.0
    return {
        "gr_engine_active_ratio": ratio,
        "tensor_active_ratio": 0.6 * ratio,
        "dram_active_ratio": 0.5 * ratio,
    }


def reading(board: Board, previous: Sample | None, current: Sample) -> GpuReading:
    """``current``'s reading with the rates since ``previous`` (the last read of the same GPU,
    None on the first): NVLink bandwidth and, on GPM boards, the activity ratios and PCIe rates,
    each an average over the interval as NVML's would be."""

    def rate(before: float | None, now: float | None) -> float | None:
        if previous is None or before is None or now is None:
            return None
        return counter_rate(CounterSample(previous.at_s, before), CounterSample(current.at_s, now))

    values: dict[str, Any] = {}
    if current.nvlink_kib is not None and previous is not None and previous.nvlink_kib is not None:
        values["nvlink_bandwidth_mb_per_s"] = nvlink_mb_per_s(
            CounterSample(previous.at_s, previous.nvlink_kib),
            CounterSample(current.at_s, current.nvlink_kib),
        )
    instances = current.reading.instances
    if board.gpm:
        average = rate(previous.activity if previous else None, current.activity)
        if average is not None:
            full = board.pcie_mib_per_s * MIB
            values["pcie_tx_bytes_per_s"] = full * (0.01 + 0.15 * average / 100.0)
            values["pcie_rx_bytes_per_s"] = full * (0.01 + 0.25 * average / 100.0)
            if not instances:  # with instances the activity is theirs
                values.update(_gpm(average))
        before = dict(previous.instance_activity) if previous else {}
        now = dict(current.instance_activity)
        instances = tuple(
            replace(mig, **_gpm(rate(before.get(mig.gi_id), now.get(mig.gi_id))))
            for mig in instances
        )
    return replace(current.reading, instances=instances, **values)
