"""Plans applied to the simulated backend, the NVML stand-in with every MIG rule enforced.

The planner's own property tests use an in-memory model; here the same promise is checked
against SimBackend through the daemon's executor: for random pairs of valid layouts on each
simulated GPU model, applying the plan gives exactly the second layout, never costs more NVML
calls than rebuilding each changed GPU, and planning again gives nothing to do.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.daemon.mig import execute
from gpud.hw.sim.backend import SimBackend
from gpud.mig.fit import FitError, ResolvedTarget, resolve
from gpud.mig.layout import GpuTarget, bundled, device_counts, select
from gpud.mig.planner import full_rebuild_cost, plan

MODELS = {
    "a100-40gb": 0x20B010DE,
    "a100-80gb": 0x20B210DE,
    "a30": 0x20B710DE,
    "h100-80gb": 0x233010DE,
    "h200": 0x233510DE,
}


def targets_for(pci: int) -> list[tuple[str, GpuTarget]]:
    """Every bundled layout that speaks about this board."""
    config = bundled()
    out = []
    for name in config.names:
        chosen = select(config, name, [(0, pci)])
        if 0 in chosen:
            out.append((name, chosen[0]))
    return out


def apply(backend: SimBackend, target: GpuTarget) -> tuple[int, int]:
    """Plan and execute on GPU 0; returns (calls made, what a full rebuild would have made)."""
    state = backend.mig_state(0)
    resolved = resolve(target, state)
    assert isinstance(resolved, ResolvedTarget), resolved
    steps = plan(state, resolved)
    created: dict[tuple[int, str], int] = {}
    for step in steps:
        execute(backend, step, created)
    return len(steps), full_rebuild_cost(state, resolved)


@st.composite
def transitions(draw: st.DrawFn) -> tuple[str, GpuTarget, GpuTarget]:
    model = draw(st.sampled_from(sorted(MODELS)))
    layouts = targets_for(MODELS[model])
    first = draw(st.sampled_from(layouts))[1]
    second = draw(st.sampled_from(layouts))[1]
    return model, first, second


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transitions())
def test_any_transition_between_bundled_layouts_lands_exactly_on_the_target(
    case: tuple[str, GpuTarget, GpuTarget],
) -> None:
    model, first, second = case
    with tempfile.TemporaryDirectory() as tmp:
        backend = SimBackend(f"{model}:1", Path(tmp))
        backend.open()
        apply(backend, first)
        calls, rebuild = apply(backend, second)
        state = backend.mig_state(0)
        assert (state.mode.current.value == "enabled") is second.enabled
        assert state.mode.pending == state.mode.current
        if second.enabled:
            assert device_counts(state) == second.devices
        assert calls <= rebuild
        again = resolve(second, state)
        assert not isinstance(again, FitError)
        assert plan(state, again) == ()
        backend.close()
