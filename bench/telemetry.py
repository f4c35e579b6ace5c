"""Telemetry reads: NVML calls per GPU per read, and the time to read all 8 GPUs of a machine.

In process, no daemon: ``read_telemetry`` is what the metrics publisher calls at scrape time, so
its cost is the hardware part of a scrape. Four machines:

* the simulated ``dgx-a100`` and ``dgx-h100`` with whole GPUs, and the ``dgx-a100`` with every GPU
  in ``all-1g.5gb`` (7 MIG instances each, 56 in all). The simulation makes no NVML call; its time
  is the model's arithmetic.
* the NVML backend over the fake ``nvmlLib`` (tests/fakenvml.py) as a DGX A100, a DGX H100, and
  the DGX H100 with 7 instances on every GPU. NVML calls are counted by the backend and checked
  against the calls the fake library received; the time includes pynvml's marshalling and the
  fake's Python callbacks (each NVML call crosses ctypes twice), so it bounds pynvml's own cost
  from above and says nothing of the driver's latency (docs/hardware-validation.md).

Each scrape reads the 8 GPUs one after the other; the first two scrapes (which set up GPM
samples and cached handles) are excluded from the timings and reported apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, log, summary_ms
from gpud.hw.nvml import NvmlBackend
from gpud.hw.sim.backend import SimBackend
from gpud.hw.telemetry import GpuReading
from gpud.hw.types import Placement
from tests.fakenvml import FakeNvml, dgx_a100, dgx_h100, installed

BUDGET_SCRAPE_P50_MS = 20.0  # issue 12's whole-scrape budget on the simulated backend
ONE_SLICE = 19  # GPU instance profile 1g.5gb (A100 40GB) / 1g.10gb (H100 80GB)


def timed(read: Callable[[int], GpuReading], scrapes: int) -> tuple[list[float], list[int]]:
    """Seconds per scrape of GPUs 0-7 after two warm-up scrapes, and the calls per GPU read of
    the last scrape."""
    durations: list[float] = []
    calls: list[int] = []
    for run in range(scrapes + 2):
        start = time.perf_counter()
        found = [read(index) for index in range(8)]
        elapsed = time.perf_counter() - start
        if run >= 2:
            durations.append(elapsed)
        calls = [r.nvml_calls for r in found]
        assert all(not r.errors and not r.lost for r in found), found
    return durations, calls


def all_one_slice(backend: SimBackend | NvmlBackend) -> None:
    for index in range(8):
        backend.set_mig_mode(index, True)
        if backend.mig_state(index).mode.current.value != "enabled":
            backend.reset_gpu(index)
        for start in range(7):
            gi = backend.create_gpu_instance(index, ONE_SLICE, Placement(start, 1))
            backend.create_compute_instance(index, gi.gi_id, 0)


def sim(spec: str, mig: bool, scrapes: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as state_dir:
        backend = SimBackend(spec, Path(state_dir))
        backend.open()
        if mig:
            all_one_slice(backend)
        durations, _ = timed(backend.read_telemetry, scrapes)
        backend.close()
    return {"scrape_8_gpus_ms": summary_ms(durations)}


def fake(make: Callable[[], FakeNvml], mig: bool, scrapes: int) -> dict[str, object]:
    library = make()
    with installed(library):
        backend = NvmlBackend(command_runner=lambda argv, timeout: _reset(library, argv))
        backend.open()
        if mig:
            all_one_slice(backend)
        seen_before = sum(library.calls.values())
        first_scrape = [backend.read_telemetry(i).nvml_calls for i in range(8)]
        assert sum(first_scrape) == sum(library.calls.values()) - seen_before
        durations, calls = timed(backend.read_telemetry, scrapes)
        seen_before = sum(library.calls.values())
        steady = sum(backend.read_telemetry(i).nvml_calls for i in range(8))
        assert steady == sum(library.calls.values()) - seen_before  # the count is NVML's
        backend.close()
    return {
        "nvml_calls_per_gpu_read": calls[0],
        "nvml_calls_first_read": first_scrape[0],
        "scrape_8_gpus_ms": summary_ms(durations),
    }


def _reset(library: FakeNvml, argv):  # nvidia-smi -r, for an A100 mode change
    import subprocess

    library.reset_gpu(library.index_of_bus_id(argv[-1]))
    return subprocess.CompletedProcess(list(argv), 0, "", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=200, help="timed scrapes per case")
    args = ap.parse_args()
    cases = {
        "sim dgx-a100": lambda: sim("dgx-a100", False, args.scrapes),
        "sim dgx-h100": lambda: sim("dgx-h100", False, args.scrapes),
        "sim dgx-a100 all-1g.5gb": lambda: sim("dgx-a100", True, args.scrapes),
        "fake-nvml dgx-a100": lambda: fake(dgx_a100, False, args.scrapes),
        "fake-nvml dgx-h100": lambda: fake(dgx_h100, False, args.scrapes),
        "fake-nvml dgx-h100 all-1g.10gb": lambda: fake(dgx_h100, True, args.scrapes),
    }
    detail: dict[str, object] = {}
    for name, run in cases.items():
        log(f"telemetry: {name}")
        detail[name] = run()

    def p50(name: str) -> float:
        return detail[name]["scrape_8_gpus_ms"]["p50"]  # type: ignore[index]

    def calls(name: str) -> int:
        return detail[name]["nvml_calls_per_gpu_read"]  # type: ignore[index]

    figures = {
        "sim_dgx_a100_scrape_p50_ms": p50("sim dgx-a100"),
        "sim_dgx_a100_mig56_scrape_p50_ms": p50("sim dgx-a100 all-1g.5gb"),
        "nvml_calls_per_read_a100": calls("fake-nvml dgx-a100"),
        "nvml_calls_per_read_h100": calls("fake-nvml dgx-h100"),
        "nvml_calls_per_read_h100_7_instances": calls("fake-nvml dgx-h100 all-1g.10gb"),
        "fake_nvml_h100_mig56_scrape_p50_ms": p50("fake-nvml dgx-h100 all-1g.10gb"),
    }
    emit(
        "telemetry",
        figures,
        {
            "sim_dgx_a100_scrape_p50_ms": BUDGET_SCRAPE_P50_MS,
            "sim_dgx_a100_mig56_scrape_p50_ms": BUDGET_SCRAPE_P50_MS,
        },
        machine="in process: simulated and fake-NVML DGX A100 / H100 (8 GPUs)",
        method="read_telemetry(0..7) back to back per scrape, after 2 warm-up scrapes; "
        "the budget is the whole scrape's (issue 12), of which these reads are a part",
        detail=detail,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
