"""Choosing a backend from the configuration, importing only the one chosen.

pynvml is imported only for the nvml backend, so a simulated node never loads it, and start-up
stays short.
"""

from __future__ import annotations

from pathlib import Path

from gpud.config.models import BackendKind
from gpud.hw.backend import Backend


def make_backend(kind: BackendKind, simulate: str | None, state_dir: Path) -> Backend:
    if kind is BackendKind.SIM or (kind is BackendKind.AUTO and simulate):
        if not simulate:
            raise ValueError(
                "backend 'sim' needs a machine to simulate: pass --simulate dgx-a100 "
                "or set 'simulate:' in the config"
            )
        from gpud.hw.sim.backend import SimBackend

        return SimBackend(simulate, state_dir)
    from gpud.hw.nvml import NvmlBackend

    return NvmlBackend()
