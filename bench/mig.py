"""MIG: plan time and NVML calls against a rebuild-every-changed-GPU baseline, and layout applies
on a running gpud (no-op budget <= 100 ms and 0 mutations; re-advertise time to kubelet).

Part 1, the planner, in process and pure. For 8 x A100-40GB and 8 x H100-80GB, every ordered pair
(A, B) of six bundled layouts (all-disabled, all-1g, all-2g, all-3g, all-balanced, all-7g in the
family's sizes, A == B included): the starting state is a blank GPU (``catalog_state``, MIG off)
brought to A by planning and replaying the plan through ``gpud.mig.model.simulate``; then
``resolve`` + ``plan`` for B on all 8 GPUs is timed (median of ``--plan-runs``), its calls are
counted and compared with ``full_rebuild_cost`` (mig-parted's strategy: a GPU whose devices differ
is emptied and rebuilt), and the plan is replayed through ``simulate`` to check that it reaches B.

Part 2, end to end: a simulated ``dgx-a100`` gpud beside the fake kubelet (and a fake PodResources
API with no pods, so a layout change asks kubelet who uses what, as on a node). (a) apply
all-1g.5gb from the bundled layouts (MIG off before); (b) ``--noop-runs`` applies of the same, each
timed around the ``ApplyMigLayout`` RPC on the control socket; (c) ``--change-runs`` round trips
all-1g.5gb -> all-balanced -> all-1g.5gb: the RPC's wall time and mutations, and when the fake
kubelet's stream threads stamped (``on_update``) the ListAndWatch message that completed the new
layout's device lists (every resource of the layout connected, listing exactly the expected
number of devices, all Healthy), measured from the RPC's start and from its return.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench._common import GPU, REPO, SPEC, emit, log, running_node, short_tmp, summary_ms
from gpud._proto.gpud.v1 import gpud_pb2
from gpud.atomic import write_atomic
from gpud.daemon.mig import BUNDLED_SOURCE, Plan, compute_plan, execute, parse_selection
from gpud.hw.sim.backend import SimBackend
from gpud.hw.types import MigLayoutState, MigMode, MigState
from gpud.mig import layout
from gpud.mig.fit import FitError, ResolvedTarget, devices_of, resolve
from gpud.mig.model import catalog_state, simulate
from gpud.mig.planner import Step, full_rebuild_cost, plan
from gpud.mig.store import Journal, MigStore, Selection
from tests.support.kubelet import HEALTHY, FakeKubelet
from tests.support.podresources import FakePodResources

NOOP_BUDGET_MS = 100.0
GPUS = 8
# The six layouts of the matrix, in each family's sizes (names from gpud/mig/layouts.yaml).
FAMILIES: dict[str, tuple[int, tuple[str, ...]]] = {
    "A100-40GB": (
        0x20B010DE,
        (
            "all-disabled",
            "all-1g.5gb",
            "all-2g.10gb",
            "all-3g.20gb",
            "all-balanced",
            "all-7g.40gb",
        ),
    ),
    "H100-80GB": (
        0x233010DE,
        (
            "all-disabled",
            "all-1g.10gb",
            "all-2g.20gb",
            "all-3g.40gb",
            "all-balanced",
            "all-7g.80gb",
        ),
    ),
}
# The end-to-end layouts (the dgx-a100's GPUs are A100-40GB).
SMALL, BALANCED = "all-1g.5gb", "all-balanced"
# mig-parted's own default config, for the parse cost of a bigger file (when shared/ is there).
MIG_PARTED_DEFAULT = REPO.parent / "shared" / "fixtures" / "mig-parted-config-default.yaml"
MIG_PREFIX = "nvidia.com/mig-"


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return ms(statistics.median(times))


# ---- part 1: the planner ------------------------------------------------------------------------


def targets_for(config: layout.LayoutFile, name: str, pci: int) -> dict[int, layout.GpuTarget]:
    targets = layout.select(config, name, [(i, pci) for i in range(GPUS)])
    if sorted(targets) != list(range(GPUS)):
        raise SystemExit(f"layout {name} does not speak about PCI 0x{pci:08X}; fix FAMILIES")
    return targets


def resolve_all(
    targets: Mapping[int, layout.GpuTarget], states: Sequence[MigLayoutState]
) -> list[ResolvedTarget]:
    out = []
    for state in states:
        resolved = resolve(targets[state.index], state)
        if isinstance(resolved, FitError):
            raise SystemExit(f"{resolved}")
        out.append(resolved)
    return out


def plan_node(
    targets: Mapping[int, layout.GpuTarget], states: Sequence[MigLayoutState]
) -> list[tuple[Step, ...]]:
    """What gpud computes per apply once the layout file is parsed: resolve + plan per GPU."""
    return [plan(s, r) for s, r in zip(states, resolve_all(targets, states), strict=True)]


def reached(state: MigLayoutState, target: ResolvedTarget) -> bool:
    want = MigMode.ENABLED if target.enabled else MigMode.DISABLED
    if state.mode.current is not want or state.mode.pending is not want:
        return False
    return devices_of(state) == target.devices if target.enabled else not state.instances


def devices_kept(state: MigLayoutState, steps: Sequence[Step]) -> int:
    """MIG devices (CIs) of ``state`` that the steps leave in place: what pods keep using."""
    if any(s.kind in ("set-mig-mode", "reset-gpu") for s in steps):
        return 0
    gone = {(s.gi_id, s.ci_id) for s in steps if s.kind == "destroy-ci"}
    return sum(
        1
        for gi in state.instances
        for ci in gi.compute_instances
        if (gi.gi_id, ci.ci_id) not in gone
    )


def start_states(config: layout.LayoutFile, name: str, pci: int) -> list[MigLayoutState]:
    """Blank GPUs (MIG off) brought to layout ``name`` through the planner and the dry run."""
    blank = [catalog_state(pci, i, enabled=False) for i in range(GPUS)]
    targets = targets_for(config, name, pci)
    states = []
    for state, resolved, steps in zip(
        blank, resolve_all(targets, blank), plan_node(targets, blank), strict=True
    ):
        after = simulate(state, steps)
        if not reached(after, resolved):
            raise SystemExit(f"GPU {state.index}: {name} not reached from a blank GPU")
        states.append(after)
    return states


def planner(runs: int) -> dict[str, Any]:
    config = layout.bundled()
    families: dict[str, Any] = {}
    for family, (pci, names) in FAMILIES.items():
        starts = {name: start_states(config, name, pci) for name in names}
        rows = []
        for src in names:
            states = starts[src]
            for dst in names:
                targets = targets_for(config, dst, pci)
                resolved = resolve_all(targets, states)
                plans = plan_node(targets, states)
                for state, target, steps in zip(states, resolved, plans, strict=True):
                    if not reached(simulate(state, steps), target):
                        raise SystemExit(f"{family} {src} -> {dst}: GPU {state.index} not reached")
                gpud = sum(len(p) for p in plans)
                rebuild = sum(
                    full_rebuild_cost(s, r) for s, r in zip(states, resolved, strict=True)
                )
                kinds = Counter(step.kind for p in plans for step in p)
                rows.append(
                    {
                        "from": src,
                        "to": dst,
                        "plan_ms": median_ms(lambda t=targets, s=states: plan_node(t, s), runs),
                        "plan_only_ms": median_ms(
                            lambda s=states, r=resolved: [
                                plan(a, b) for a, b in zip(s, r, strict=True)
                            ],
                            runs,
                        ),
                        "gpud_mutations": gpud,
                        "rebuild_mutations": rebuild,
                        "devices_kept": sum(
                            devices_kept(s, p) for s, p in zip(states, plans, strict=True)
                        ),
                        "devices_before": sum(len(devices_list(s)) for s in states),
                        "steps": dict(sorted(kinds.items())),
                    }
                )
            log(f"planner: {family} from {src} done")
        gpud_total = sum(r["gpud_mutations"] for r in rows)
        rebuild_total = sum(r["rebuild_mutations"] for r in rows)
        families[family] = {
            "pci_device_id": f"0x{pci:08X}",
            "gpus": GPUS,
            "layouts": list(names),
            "gpud_mutations_total": gpud_total,
            "rebuild_mutations_total": rebuild_total,
            "ratio": round(gpud_total / rebuild_total, 3),
            "max_plan_ms": max(r["plan_ms"] for r in rows),
            "transitions": rows,
        }
    return families


def devices_list(state: MigLayoutState) -> list[str]:
    return [ci.mig_uuid for gi in state.instances for ci in gi.compute_instances]


# ---- part 2: a running gpud ---------------------------------------------------------------------


@dataclasses.dataclass
class Watch:
    """Stamps the first ListAndWatch message after which ``expect`` holds on the fake kubelet."""

    kubelet: FakeKubelet
    expect: dict[str, int]  # resource -> devices, all Healthy, stream connected
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    at: float = 0.0
    messages: Counter[str] = dataclasses.field(default_factory=Counter)
    timeline: list[tuple[float, str, int, int]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def holds(self) -> bool:
        k = self.kubelet
        for resource, count in self.expect.items():
            if not k.connected(resource):
                return False
            devices = k.devices(resource)
            if len(devices) != count or any(d.health != HEALTHY for d in devices.values()):
                return False
        return True

    def __call__(self, resource: str, now: float) -> None:
        devices = self.kubelet.devices(resource)
        unhealthy = sum(1 for d in devices.values() if d.health != HEALTHY)
        with self.lock:
            self.messages[resource] += 1
            self.timeline.append((now, resource, len(devices), unhealthy))
            if self.done.is_set() or not self.holds():
                return
            self.at = now
            self.done.set()


def expected_resources(config: layout.LayoutFile, name: str, pcis: Sequence[int]) -> dict[str, int]:
    """Resource -> device count for layout ``name`` on the node (migStrategy mixed)."""
    counts: Counter[str] = Counter()
    for target in layout.select(config, name, list(enumerate(pcis))).values():
        for device, n in target.devices:
            counts[MIG_PREFIX + device] += n
    return dict(counts)


def schedstat_ns(pid: int) -> int:
    """On-CPU time of all of the process's live threads (exact, from schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def kubelet_mig_ids(kubelet: FakeKubelet, resources: Sequence[str]) -> set[str]:
    return {i for r in resources if kubelet.connected(r) for i in kubelet.devices(r)}


def gpud_mig_ids(stub: Any) -> set[str]:
    reply = stub.GetMigState(gpud_pb2.GetMigStateRequest(), timeout=30)
    return {i.mig_uuid for g in reply.gpus for i in g.instances}


def change(
    node: Any, config: layout.LayoutFile, name: str, before: dict[str, int], pcis: Sequence[int]
) -> dict[str, Any]:
    """Apply layout ``name`` and time it to the kubelet; ``before`` is the layout's resources."""
    k = node.kubelet
    expect = expected_resources(config, name, pcis)
    vanished = [r for r in before if r not in expect]
    watch = Watch(k, expect)
    registrations = len(k.registrations)
    gone: dict[str, float] = {}

    def wait_gone() -> None:
        k.wait_until(lambda: not any(k.connected(r) for r in vanished), 30.0, "streams to end")
        gone["at"] = time.monotonic()

    waiter = threading.Thread(target=wait_gone, daemon=True) if vanished else None
    k.on_update = watch
    if waiter is not None:
        waiter.start()
    t0 = time.monotonic()
    resp = node.gpud.stub.ApplyMigLayout(
        gpud_pb2.ApplyMigLayoutRequest(config_name=name), timeout=300
    )
    t_ret = time.monotonic()
    if resp.result != "applied":
        raise SystemExit(f"apply {name}: {resp.result}: {resp.message}")
    if not watch.done.wait(timeout=30.0):
        seen = {r: (k.connected(r), len(k.devices(r))) for r in expect}
        raise SystemExit(f"apply {name}: kubelet never saw {expect}; (connected, devices): {seen}")
    if waiter is not None:
        waiter.join(timeout=35.0)
    k.on_update = None
    advertised = kubelet_mig_ids(k, list(expect))
    if advertised != gpud_mig_ids(node.gpud.stub):
        raise SystemExit(f"apply {name}: kubelet's MIG devices differ from gpud's MIG state")
    new_regs = [r for r in k.registrations[registrations:] if r.resource in expect]
    return {
        "layout": name,
        "mutations": resp.mutations,
        "apply_s": t_ret - t0,
        "to_kubelet_from_start_s": watch.at - t0,
        "to_kubelet_from_return_s": watch.at - t_ret,
        "vanished_streams_ended_from_start_ms": ms(gone["at"] - t0) if gone else None,
        "messages": dict(sorted(watch.messages.items())),
        "registrations_ms": {r.resource: ms(r.at - t0) for r in new_regs},
        "timeline": [
            {"ms": ms(t - t0), "resource": r, "devices": n, "unhealthy": u}
            for t, r, n, u in watch.timeline
        ],
    }


def rebuild_for(config: layout.LayoutFile, src: str, dst: str, pci: int) -> tuple[int, int]:
    """(gpud's, mig-parted's) calls for ``src`` -> ``dst`` on 8 GPUs of ``pci``, in process."""
    states = start_states(config, src, pci)
    targets = targets_for(config, dst, pci)
    resolved = resolve_all(targets, states)
    gpud = sum(len(p) for p in plan_node(targets, states))
    return gpud, sum(full_rebuild_cost(s, r) for s, r in zip(states, resolved, strict=True))


def end_to_end(noop_runs: int, change_runs: int) -> dict[str, Any]:
    config = layout.bundled()
    podres: list[FakePodResources] = []

    def setup(root: Path) -> list[str]:
        sock = root / "podres" / "kubelet.sock"
        podres.append(FakePodResources(sock).start())
        (root / "gpud.yaml").write_text(f"version: v1\npaths:\n  podResourcesSocket: {sock}\n")
        return ["--config", str(root / "gpud.yaml")]

    try:
        with running_node("mig", setup=setup) as node:
            out = run_node(node, config, noop_runs, change_runs)
            out["scratch_fs"] = fs_type(node.root)
            out["podresources_list_calls"] = len(podres[0].calls) if podres else 0
            return out
    finally:
        for p in podres:
            p.stop()


def run_node(
    node: Any, config: layout.LayoutFile, noop_runs: int, change_runs: int
) -> dict[str, Any]:
    k, stub = node.kubelet, node.gpud.stub
    pcis = [
        int(g.pci_device_id, 16) for g in sorted(node.gpud.status().gpus, key=lambda g: g.index)
    ]
    time.sleep(0.5)  # let start-up work finish

    # (a) MIG off -> all-1g.5gb: the whole-GPU resource goes away, 56 MIG devices appear.
    initial = change(node, config, SMALL, {GPU: GPUS}, pcis)
    log(f"mig: initial {SMALL}: {initial['mutations']} calls in {ms(initial['apply_s'])} ms")

    # (b) the same layout again: nothing to do.
    noop: list[float] = []
    noop_mutations: list[int] = []
    results: set[str] = set()
    updates0 = {r: k.updates(r) for r in (GPU, *expected_resources(config, SMALL, pcis))}
    cpu0 = schedstat_ns(node.gpud.pid or 0)
    for _ in range(noop_runs):
        t0 = time.monotonic()
        resp = stub.ApplyMigLayout(gpud_pb2.ApplyMigLayoutRequest(config_name=SMALL), timeout=30)
        noop.append(time.monotonic() - t0)
        noop_mutations.append(resp.mutations)
        results.add(resp.result)
    cpu_ms = (schedstat_ns(node.gpud.pid or 0) - cpu0) / 1e6
    noop_messages = sum(k.updates(r) - n for r, n in updates0.items())
    log(f"mig: {noop_runs} no-op applies, p50 {summary_ms(noop)['p50']} ms")

    # (c) layout changes, there and back.
    changes: dict[str, list[dict[str, Any]]] = {BALANCED: [], SMALL: []}
    small = expected_resources(config, SMALL, pcis)
    balanced = expected_resources(config, BALANCED, pcis)
    for i in range(change_runs):
        changes[BALANCED].append(change(node, config, BALANCED, small, pcis))
        time.sleep(0.2)
        changes[SMALL].append(change(node, config, SMALL, balanced, pcis))
        time.sleep(0.2)
        log(f"mig: change round trip {i + 1}/{change_runs}")
    return {
        "initial": initial,
        "noop_s": noop,
        "noop_mutations": noop_mutations,
        "noop_results": sorted(results),
        "noop_gpud_cpu_ms_per_call": round(cpu_ms / max(noop_runs, 1), 3),
        "noop_stream_messages": noop_messages,
        "changes": changes,
        "pcis": pcis,
    }


def fs_type(path: Path) -> str:
    """The file system holding ``path`` (fsync costs differ by orders of magnitude)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fields[2]
    except OSError:
        pass
    return f"{kind} ({best})"


# ---- in process: where a no-op and a mutation spend their time ----------------------------------


def in_process(runs: int) -> dict[str, Any]:
    """The parts of a no-op and of a layout change, timed in this process on the same disk."""
    config = layout.bundled()
    text = layout.bundled_text()
    pci = FAMILIES["A100-40GB"][0]
    states = {s.index: s for s in start_states(config, SMALL, pci)}
    gpus = [_Gpu(i, pci) for i in states]
    selection = Selection(SMALL, text, BUNDLED_SOURCE)

    def noop() -> Plan:
        return compute_plan(parse_selection(selection), SMALL, gpus, states)

    if noop().steps:
        raise SystemExit("the in-process no-op planned steps")
    targets = targets_for(config, SMALL, pci)
    out: dict[str, Any] = {
        "noop_parse_and_compute_plan_ms": median_ms(noop, runs),
        "layout_parse_ms": median_ms(lambda: layout.parse(text), runs),
        "yaml_safe_load_ms": median_ms(lambda: yaml.load(text, Loader=yaml.SafeLoader), runs),
        "yaml_c_safe_load_ms": (
            median_ms(lambda: yaml.load(text, Loader=yaml.CSafeLoader), runs)
            if hasattr(yaml, "CSafeLoader")
            else None
        ),
        "resolve_and_plan_8_gpus_ms": median_ms(
            lambda: plan_node(targets, list(states.values())), runs
        ),
        "bundled_layouts_bytes": len(text.encode()),
    }
    if MIG_PARTED_DEFAULT.exists():
        other = MIG_PARTED_DEFAULT.read_text()
        out["layout_parse_mig_parted_default_ms"] = median_ms(lambda: layout.parse(other), runs)
        out["mig_parted_default_bytes"] = len(other.encode())
    with short_tmp("migio") as root:
        out["scratch_fs"] = fs_type(root)
        store = MigStore(root / "state")
        out["store_select_ms"] = median_ms(lambda: store.select(selection), runs)
        out["write_atomic_300b_ms"] = median_ms(
            lambda: write_atomic(root / "f.json", b"x" * 300), runs
        )
        out["apply_loop"] = apply_loop(root / "state", store)
    return out


@dataclasses.dataclass(frozen=True)
class _Gpu:
    """What ``compute_plan`` reads of a GPU."""

    index: int
    pci_device_id: int
    mig: MigState = dataclasses.field(default=MigState(MigMode.DISABLED, MigMode.DISABLED))
    lost: bool = False


def apply_loop(state_dir: Path, store: MigStore) -> dict[str, Any]:
    """MigController._run's loop without the event loop: per step, the journal rewrite (as
    gpud does it: the whole journal, layout text and all steps) and the simulated NVML call, for
    all-1g.5gb -> all-balanced on a simulated dgx-a100."""
    backend = SimBackend(SPEC, state_dir)
    backend.open()
    try:
        run_steps(backend, store, SMALL)
        return {"from": SMALL, **run_steps(backend, store, BALANCED)}
    finally:
        backend.close()


def run_steps(backend: SimBackend, store: MigStore, name: str) -> dict[str, Any]:
    states = {i: backend.mig_state(i) for i in range(GPUS)}
    gpus = [_Gpu(i, s.pci_device_id) for i, s in states.items()]
    selection = Selection(name, layout.bundled_text(), BUNDLED_SOURCE)
    steps = compute_plan(parse_selection(selection), name, gpus, states).steps
    journal = Journal(selection, "running", tuple(s.to_dict() for s in steps))
    created: dict[tuple[int, str], int] = {}
    record: list[float] = []
    serialize: list[float] = []
    call: list[float] = []
    for i, step in enumerate(steps):
        journal = dataclasses.replace(journal, next_step=i, mutations=i)
        t0 = time.perf_counter()
        json.dumps({"version": 1, "journal": dataclasses.asdict(journal)}, indent=1).encode()
        t1 = time.perf_counter()
        store.record(journal)
        t2 = time.perf_counter()
        execute(backend, step, created)
        t3 = time.perf_counter()
        serialize.append(t1 - t0)
        record.append(t2 - t1)
        call.append(t3 - t2)
    return {
        "to": name,
        "steps": len(steps),
        "journal_bytes": store.journal_path.stat().st_size,
        "journal_record_ms_per_step": ms(statistics.median(record)),
        "journal_serialize_only_ms_per_step": ms(statistics.median(serialize)),
        "sim_call_ms_per_step": ms(statistics.median(call)),
        "sim_state_bytes": backend.state_path.stat().st_size,
        "journal_total_ms": ms(sum(record)),
        "sim_total_ms": ms(sum(call)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-runs", type=int, default=25, help="timed plans per transition (25)")
    ap.add_argument("--noop-runs", type=int, default=30, help="no-op applies (default 30)")
    ap.add_argument("--change-runs", type=int, default=5, help="change round trips (default 5)")
    ap.add_argument("--io-runs", type=int, default=20, help="in-process cost samples (20)")
    args = ap.parse_args()

    families = planner(args.plan_runs)
    rows = [r for f in families.values() for r in f["transitions"]]
    gpud_total = sum(f["gpud_mutations_total"] for f in families.values())
    rebuild_total = sum(f["rebuild_mutations_total"] for f in families.values())
    worse = sum(1 for r in rows if r["gpud_mutations"] > r["rebuild_mutations"])
    changed = [r for r in rows if r["rebuild_mutations"] > 0]

    e2e = end_to_end(args.noop_runs, args.change_runs)
    pci = e2e["pcis"][0]
    config = layout.bundled()
    figures: dict[str, Any] = {
        "planner_max_plan_ms": max(f["max_plan_ms"] for f in families.values()),
        "planner_gpud_mutations": gpud_total,
        "planner_rebuild_mutations": rebuild_total,
        "planner_mutation_ratio": round(gpud_total / rebuild_total, 3),
        "planner_transitions_worse_than_rebuild": worse,
    }
    noop = summary_ms(e2e["noop_s"])
    figures |= {
        "noop_apply_p50_ms": noop["p50"],
        "noop_apply_max_ms": noop["max"],
        "noop_mutations_max": max(e2e["noop_mutations"]),
        "initial_apply_ms": ms(e2e["initial"]["apply_s"]),
        "initial_apply_mutations": e2e["initial"]["mutations"],
        "initial_to_kubelet_from_start_ms": ms(e2e["initial"]["to_kubelet_from_start_s"]),
    }
    detail_changes: dict[str, Any] = {}
    for name, key, src in ((BALANCED, "to_balanced", SMALL), (SMALL, "to_1g", BALANCED)):
        runs = e2e["changes"][name]
        gpud_calls, rebuild = rebuild_for(config, src, name, pci)
        apply_s = [r["apply_s"] for r in runs]
        start_s = [r["to_kubelet_from_start_s"] for r in runs]
        ret_s = [r["to_kubelet_from_return_s"] for r in runs]
        figures |= {
            f"change_{key}_apply_p50_ms": summary_ms(apply_s)["p50"],
            f"change_{key}_mutations": max(r["mutations"] for r in runs),
            f"change_{key}_rebuild_mutations": rebuild,
            f"change_{key}_to_kubelet_from_start_p50_ms": summary_ms(start_s)["p50"],
            f"change_{key}_to_kubelet_from_return_p50_ms": summary_ms(ret_s)["p50"],
        }
        detail_changes[key] = {
            "from": src,
            "to": name,
            "apply_ms": summary_ms(apply_s),
            "mutations": sorted({r["mutations"] for r in runs}),
            "planned_in_process": gpud_calls,
            "rebuild_mutations": rebuild,
            "apply_ms_per_mutation": round(
                statistics.median(apply_s) * 1000.0 / max(runs[0]["mutations"], 1), 3
            ),
            "to_kubelet_from_start_ms": summary_ms(start_s),
            "to_kubelet_from_return_ms": summary_ms(ret_s),
            "stream_messages": [r["messages"] for r in runs],
            "new_registrations_ms": [r["registrations_ms"] for r in runs],
            "vanished_streams_ended_from_start_ms": [
                r["vanished_streams_ended_from_start_ms"] for r in runs
            ],
            "timeline_first_run": runs[0]["timeline"],
        }
    initial = dict(e2e["initial"])
    for key in ("apply_s", "to_kubelet_from_start_s", "to_kubelet_from_return_s"):
        initial[key[:-2] + "_ms"] = ms(initial.pop(key))
    io = in_process(args.io_runs)

    emit(
        "mig",
        figures,
        {
            "noop_apply_p50_ms": NOOP_BUDGET_MS,
            "noop_apply_max_ms": NOOP_BUDGET_MS,
            "noop_mutations_max": 0,
            "planner_transitions_worse_than_rebuild": 0,
        },
        planner_machines={
            f: f"{GPUS} x {f} ({v['pci_device_id']}), pure, in process" for f, v in families.items()
        },
        runs={"plan": args.plan_runs, "noop": args.noop_runs, "change": args.change_runs},
        method=(
            "planner: resolve+plan for 8 GPUs, median of --plan-runs, from states built by "
            "simulate(catalog_state -> layout A); rebuild = sum of full_rebuild_cost per GPU "
            "(mig-parted: every changed GPU emptied and rebuilt). end to end: wall time of the "
            "ApplyMigLayout RPC on the control socket of a simulated dgx-a100 gpud; to_kubelet = "
            "monotonic() stamped by the fake kubelet's stream thread on the ListAndWatch message "
            "after which every resource of the new layout is connected with exactly the expected "
            "devices, all Healthy (the fake kubelet is Python and shares the CPUs)"
        ),
        detail={
            "planner": families,
            "planner_changed_transitions": len(changed),
            "planner_transitions": len(rows),
            "noop_apply_ms": noop,
            "noop_results": e2e["noop_results"],
            "noop_gpud_cpu_ms_per_call": e2e["noop_gpud_cpu_ms_per_call"],
            "noop_stream_messages": e2e["noop_stream_messages"],
            "initial": initial,
            "changes": detail_changes,
            "podresources_list_calls": e2e["podresources_list_calls"],
            "gpud_state_fs": e2e["scratch_fs"],
            "in_process": io,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
