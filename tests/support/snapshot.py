"""A NodeState of a simulated machine without a daemon, for tests of pure functions over it.

The parts come from the same places the daemon takes them (the simulated backend, the resource
planner, :mod:`gpud.node.derive`), so a snapshot here has the shape a publisher is handed; only
the plumbing around them (reconcile passes, kubelet) is left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from gpud.config.load import parse
from gpud.hw.sim.backend import SimBackend
from gpud.node.derive import device_states, mig_layouts, sharing_state
from gpud.node.state import NodeState, XidRecord
from gpud.resources.sets import build_resource_sets


def all_of(backend: SimBackend, index: int, profile_name: str) -> None:
    """Fill GPU ``index`` with GPU instances of ``profile_name``, one full compute instance each
    (what ``all-1g.5gb`` does), turning MIG on first."""
    backend.set_mig_mode(index, True)
    backend.reset_gpu(index)
    profile = next(p for p in backend.mig_state(index).profiles if p.name == profile_name)
    ci = profile.full_ci
    assert ci is not None
    for placement in profile.placements:
        gi = backend.create_gpu_instance(index, profile.profile_id, placement)
        backend.create_compute_instance(index, gi.gi_id, ci.profile_id)


def snapshot(
    backend: SimBackend,
    config: str = "version: v1\n",
    *,
    unhealthy: Mapping[str, str] | None = None,
    withdrawn: Iterable[str] = (),
    last_xid: Mapping[str, XidRecord] | None = None,
    pod_resources_socket: Path = Path("/nonexistent/kubelet.sock"),
) -> NodeState:
    """The snapshot the daemon would publish for ``backend`` (opened) as it is now."""
    cfg = parse(config)
    gpus = tuple(backend.gpus())
    states = {g.index: backend.mig_state(g.index) for g in gpus if g.mig.capable and not g.lost}
    layouts = mig_layouts(states)
    reasons = dict(unhealthy or {})
    gone = frozenset(withdrawn)
    strategy = cfg.device_plugin.mig_strategy
    plan = build_resource_sets(gpus, states, reasons, strategy, cfg.sharing)
    return NodeState(
        generation=1,
        version="test",
        started=time.monotonic(),
        config=cfg,
        config_file=None,
        kubelet_dir=Path("/var/lib/kubelet"),
        pod_resources_socket=pod_resources_socket,
        system=backend.system(),
        backend_error="",
        gpus=gpus,
        unhealthy=MappingProxyType(reasons),
        devices=device_states(gpus, layouts, reasons, gone, last_xid or {}),
        mig=layouts,
        mig_status=None,
        withdrawn=gone,
        resources=plan.sets,
        resource_error="",
        resource_warnings=plan.warnings,
        sharing=sharing_state(cfg.sharing),
        plugins=(),
    )
