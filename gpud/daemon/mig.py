"""Applying a MIG layout on the node: the effectful shell around the pure MIG core.

One apply: parse and select the layout, read every targeted GPU, refuse before any mutation if a
GPU cannot hold its target, plan the smallest change, ask kubelet (PodResources) and NVML who uses
what the plan would destroy and refuse unless forced, take the affected GPUs' devices away from
kubelet, then run the steps one by one with the journal rewritten before each. The outcome is
the new layout advertised without a restart, or a failure that says how far it got.

Crash safety does not rely on replaying the journal's steps: the GPUs themselves say what
exists, so an interrupted apply is finished by planning again from what is there to the journal's
target. Every instance that is not part of the target is destroyed on the way, so nothing
half-built is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpud.config.models import MigStrategy
from gpud.hw.backend import MigBackend
from gpud.hw.errors import HwError
from gpud.hw.types import GpuInfo, MigLayoutState, MigMode
from gpud.k8s.podresources import PodResourcesUnavailable, list_device_users, users_of
from gpud.mig import layout
from gpud.mig.fit import TIMES, FitError, ResolvedTarget, product, resolve
from gpud.mig.layout import GpuTarget, LayoutFile, device_counts, shown
from gpud.mig.planner import Step, plan
from gpud.mig.store import Journal, MigStore, Selection
from gpud.node.requests import Outcome, Refused
from gpud.resources.sets import single_strategy_problem

log = logging.getLogger(__name__)

# kubelet answers List in milliseconds; one that has not answered in 5 s is hung, and an apply
# waits for it holding the MIG lock.
PODRESOURCES_TIMEOUT_S = 5.0
# How often an apply waiting for pods to leave asks again.
POD_POLL_S = 2.0
BUNDLED_SOURCE = "gpud's bundled layouts"


@dataclass
class Node:
    """The daemon's view the controller reads and the hooks it calls; kept narrow on purpose."""

    gpus: Callable[[], Sequence[GpuInfo]]
    pod_resources_socket: Callable[[], Path]
    # The kubelet directory found on this node (device plugins or pod resources), None when
    # kubelet is not installed: only then may an apply go ahead without asking kubelet.
    kubelet_found: Callable[[], Path | None]
    mig_strategy: Callable[[], MigStrategy]
    # Withdraw (or, with an empty set, restore) the devices of these physical GPUs and wait
    # until kubelet has been told.
    withdraw: Callable[[frozenset[str]], Awaitable[None]]
    # Re-read the inventory and MIG states after a change and re-advertise.
    refreshed: Callable[[], Awaitable[None]]
    # Called once after an apply that changed the GPUs (MIG device names in the CDI spec are
    # stale from then on).
    layout_changed: Callable[[], Awaitable[None]]
    # Told of every apply's outcome (start-up restores and dry runs included) and its wall time.
    finished: Callable[[Selection, bool, Outcome, float], None] = lambda *_: None
    # Told once when an apply starts waiting for pods to leave: who holds what, for how long.
    waiting: Callable[[Selection, tuple[str, ...], float], None] = lambda *_: None
    # Told when a real apply is about to make its first NVML call, with its steps and the GPUs
    # whose devices are withdrawn.
    started: Callable[[Selection, Sequence[Step], tuple[str, ...]], None] = lambda *_: None
    states: dict[int, MigLayoutState] = field(default_factory=dict)


def read_selection(
    name: str, text: str | None, source: str, config_file: Path | None, origin: str = ""
) -> Selection:
    """The layout source for a request: the text sent (even empty: an empty file is an error,
    never a reason to fall back), else the configured file, else gpud's bundled layouts."""
    if text is not None:
        return Selection(name, text, layout.cut(source, 200) or "<request>", origin)
    if config_file is not None:
        try:
            return Selection(name, layout.read_text(config_file), str(config_file), origin)
        except layout.LayoutError as exc:
            raise Refused(f"mig.configFile: {exc}", "invalid") from None
    return Selection(name, layout.bundled_text(), BUNDLED_SOURCE, origin)


def told(selection: Selection) -> str:
    """Where a layout came from and who chose it, as events and Events name it."""
    if selection.origin:
        return f"{selection.source}, chosen by {selection.origin}"
    return selection.source


def label_owns_layout(value: str) -> str:
    """Why an apply from elsewhere is refused while the Node carries a layout label."""
    return (
        f"this node's MIG layout is chosen by the Node label nvidia.com/mig.config={value} "
        "(the cluster's choice wins while the label is set); nothing was changed. Change the "
        "label (kubectl label node NODE nvidia.com/mig.config=NAME --overwrite), or remove it "
        "to choose the layout here"
    )


def waits_for_pods(outcome: Outcome, dry_run: bool, left_s: float) -> bool:
    """Whether an apply refused because pods or processes hold what it would destroy may try
    again: they leave (a rollout, a finished job); a layout that cannot be advertised or a
    kubelet that cannot be asked (refusals that name nobody) do not mend by waiting."""
    if dry_run or left_s <= 0:
        return False
    return outcome.error_kind == "refused" and bool(outcome.in_use_by)


def parse_selection(selection: Selection) -> LayoutFile:
    """The parsed file of ``selection``; Refused('invalid') with every problem when it is bad."""
    try:
        return layout.parse(selection.text, selection.source)
    except layout.LayoutError as exc:
        raise Refused(str(exc), "invalid") from None


@dataclass(frozen=True)
class Plan:
    """Every step for the node, and why the configured strategy could not advertise the result
    ("" when it can)."""

    steps: tuple[Step, ...]
    strategy_problem: str = ""


def compute_plan(
    config: LayoutFile,
    name: str,
    gpus: Sequence[GpuInfo],
    states: Mapping[int, MigLayoutState],
    strategy: MigStrategy = MigStrategy.MIXED,
) -> Plan:
    """All steps for the node, GPU by GPU; raises Refused('invalid') before anything changes.

    A GPU without MIG is left alone when the layout turns MIG off, and when it is one of
    ``devices: all`` beside GPUs that can do MIG (as mig-parted does); a layout that names it, or
    turns MIG on for a node where no GPU can, is refused with "MIG is not supported".
    """
    try:
        targets = layout.select(config, name, [(g.index, g.pci_device_id) for g in gpus])
    except layout.LayoutError as exc:
        raise Refused(str(exc), "invalid") from None
    if not targets:
        raise Refused(
            f"layout {shown(name)} in {config.source} matches no GPU on this node", "invalid"
        )
    by_index = {g.index: g for g in gpus}
    some_capable = any(by_index[i].mig.capable for i, t in targets.items() if t.enabled)
    problems: list[str] = []
    steps: list[Step] = []
    resolved: dict[int, ResolvedTarget] = {}
    for index in sorted(targets):
        target = targets[index]
        state = states.get(index)
        gpu = by_index[index]
        if not gpu.mig.capable:
            if target.enabled and (target.named or not some_capable):
                problems.append(
                    f"GPU {index} ({gpu.uuid}, {product(gpu.pci_device_id)}): "
                    "MIG is not supported on this GPU"
                )
            continue
        if state is None:  # read_states skips lost GPUs
            problems.append(f"GPU {index} ({gpu.uuid}) is lost: its MIG state cannot be read")
            continue
        fitted = resolve(target, state)
        if isinstance(fitted, FitError):
            problems.append(str(fitted))
            continue
        resolved[index] = fitted
        steps.extend(plan(state, fitted))
    if problems:
        raise Refused(
            f"layout {shown(name)} does not fit this node; nothing was changed:\n"
            + "\n".join(f"  {p}" for p in problems),
            "invalid",
        )
    problem = ""
    if strategy is MigStrategy.SINGLE and steps:
        problem = single_strategy_problem(*_profiles_after(gpus, states, resolved))
    return Plan(tuple(steps), problem)


def _profiles_after(
    gpus: Sequence[GpuInfo],
    states: Mapping[int, MigLayoutState],
    resolved: Mapping[int, ResolvedTarget],
) -> tuple[list[int], dict[int, list[str]]]:
    """The node after the apply, as migStrategy single looks at it: GPUs without MIG in force,
    and the device profiles of the others."""
    full: list[int] = []
    migs: dict[int, list[str]] = {}
    for gpu in gpus:
        target = resolved.get(gpu.index)
        state = states.get(gpu.index)
        if target is not None:
            enabled = target.enabled
            names = [ci.name for gi in target.gis for ci in gi.cis]
        else:
            enabled = gpu.mig.current is MigMode.ENABLED
            names = [n for n, c in device_counts(state) for _ in range(c)] if state else []
        if enabled:
            migs[gpu.index] = names
        else:
            full.append(gpu.index)
    return full, migs


def describe_state(state: MigLayoutState) -> str:
    """What a GPU holds, the way ``mig assert`` reports a difference."""
    if state.mode.current is not MigMode.ENABLED:
        held = "MIG disabled"
    else:
        counts = device_counts(state)
        held = "MIG enabled, " + (_counted(counts) if counts else "no MIG devices")
    if state.mode.pending is not state.mode.current:
        held += f" (pending: {state.mode.pending.value})"
    return held


def describe_target(target: GpuTarget) -> str:
    if not target.enabled:
        return "MIG disabled"
    return "MIG enabled, " + (_counted(target.devices) if target.devices else "no MIG devices")


def _counted(counts: Iterable[tuple[str, int]]) -> str:
    return ", ".join(n if c == 1 else f"{n} {TIMES}{c}" for n, c in counts)


def differences(
    config: LayoutFile, name: str, gpus: Sequence[GpuInfo], states: Mapping[int, MigLayoutState]
) -> tuple[str, ...]:
    """Where the GPUs differ from layout ``name``, one line per GPU; () when they hold it.

    "Holds it" means what ``mig apply`` would call unchanged: no step to make. Refused('invalid')
    when the layout is wrong or cannot be built here, as for an apply.
    """
    steps = compute_plan(config, name, gpus, states).steps
    targets = layout.select(config, name, [(g.index, g.pci_device_id) for g in gpus])
    out = []
    for index in sorted({s.gpu for s in steps}):
        held, wanted = describe_state(states[index]), describe_target(targets[index])
        calls = sum(1 for s in steps if s.gpu == index)
        if held == wanted:
            out.append(
                f"GPU {index}: holds {held}, but {calls} NVML calls are needed to finish it "
                "(an instance without its compute instance, or a pending mode)"
            )
        else:
            out.append(f"GPU {index}: holds {held}; the layout wants {wanted}")
    return tuple(out)


def affected_uuids(
    steps: Iterable[Step], states: Mapping[int, MigLayoutState]
) -> dict[int, set[str]]:
    """Per GPU, the device UUIDs the steps take away (a mode change takes the whole GPU)."""
    out: dict[int, set[str]] = {}
    for step in steps:
        state = states[step.gpu]
        hit = out.setdefault(step.gpu, set())
        if step.kind in ("set-mig-mode", "reset-gpu"):
            hit.add(state.uuid)
            hit.update(ci.mig_uuid for gi in state.instances for ci in gi.compute_instances)
        elif step.kind in ("destroy-ci", "destroy-gi"):
            for gi in state.instances:
                if gi.gi_id != step.gi_id:
                    continue
                hit.update(
                    ci.mig_uuid
                    for ci in gi.compute_instances
                    if step.kind == "destroy-gi" or ci.ci_id == step.ci_id
                )
    return out


class MigController:
    def __init__(self, backend: MigBackend, store: MigStore, node: Node) -> None:
        self.backend = backend
        self.store = store
        self.node = node
        self._lock = asyncio.Lock()
        # The longest the lock was held since start, and by what: what the bounds on input buy,
        # recorded so that operators and tests read it instead of timing calls themselves.
        self.longest_hold: tuple[float, str] = (0.0, "")
        # Set once start-up recovery is over: MIG calls from the control API wait for it, so
        # nobody sees (or changes) a layout that is still being restored.
        self.recovered = asyncio.Event()

    @contextlib.asynccontextmanager
    async def _locked(self, what: str) -> AsyncIterator[None]:
        async with self._lock:
            start = time.monotonic()
            try:
                yield
            finally:
                held = time.monotonic() - start
                if held > self.longest_hold[0]:
                    self.longest_hold = (held, what)

    def _read(self) -> dict[int, MigLayoutState]:
        """The MIG state of every MIG-capable GPU (blocking: NVML)."""
        return {
            gpu.index: self.backend.mig_state(gpu.index)
            for gpu in self.node.gpus()
            if gpu.mig.capable and not gpu.lost
        }

    async def read_states(self) -> dict[int, MigLayoutState]:
        """Read the MIG states into the node's view (in a thread: NVML blocks)."""
        self.node.states = await asyncio.to_thread(self._read)
        return self.node.states

    async def apply(
        self, selection: Selection, dry_run: bool, force: bool, wait_for_pods_s: float = 0.0
    ) -> Outcome:
        """Apply ``selection``; while pods hold what it would destroy, try again every
        :data:`POD_POLL_S` until ``wait_for_pods_s`` have passed.

        Each try runs in a task of its own that the caller's cancellation does not reach: a
        client that goes away (Ctrl-C on ``gpudctl mig apply``, a label changed again while
        this one waits) stops the waiting, never an apply half-way through its steps.
        """
        await self.recovered.wait()
        started = time.monotonic()
        deadline = started + wait_for_pods_s
        announced = False
        while True:
            attempt = self._attempt(selection, dry_run, force, started, deadline)
            outcome = await asyncio.shield(asyncio.ensure_future(attempt))
            left = deadline - time.monotonic()
            if not waits_for_pods(outcome, dry_run, left):
                return outcome
            if not announced:
                self.node.waiting(selection, outcome.in_use_by, left)
                announced = True
            await asyncio.sleep(min(POD_POLL_S, left))

    async def _attempt(
        self,
        selection: Selection,
        dry_run: bool,
        force: bool,
        started: float,
        deadline: float,
        forced_by: str = "--force",
    ) -> Outcome:
        """One try; the outcome is announced unless the caller will try again."""
        outcome = await self._apply_parsed(selection, dry_run, force, forced_by)
        now = time.monotonic()
        if waits_for_pods(outcome, dry_run, deadline - now):
            return outcome
        if deadline > started and outcome.error_kind == "refused" and outcome.in_use_by:
            outcome = dataclasses.replace(
                outcome,
                message=f"{outcome.message}\n(still in use after waiting "
                f"{deadline - started:.0f} s for them to leave)",
            )
        self.node.finished(selection, dry_run, outcome, now - started)
        return outcome

    async def current_states(self) -> dict[int, MigLayoutState]:
        """The MIG states as they are between applies (never half-way through one)."""
        await self.recovered.wait()
        async with self._locked("a MIG state read"):
            return await self.read_states()

    async def differences(self, selection: Selection) -> tuple[str, ...]:
        """Where the GPUs differ from ``selection`` (see :func:`differences`); Refused('invalid')
        for a bad layout. Takes no lock and waits for nothing: a health check must not queue
        behind an apply, and what it reads during one is what the GPUs hold at that moment."""
        config = await asyncio.to_thread(parse_selection, selection)
        states = await asyncio.to_thread(self._read)
        return await asyncio.to_thread(
            differences, config, selection.name, self.node.gpus(), states
        )

    async def _apply_parsed(
        self, selection: Selection, dry_run: bool, force: bool, forced_by: str = "--force"
    ) -> Outcome:
        """Parse and check the file first, then take the lock: a large or bad file costs its
        sender the parse, not every other MIG call a wait. ``forced_by`` says, in the outcome,
        who skipped the checks that ``force`` skips."""
        verb = "dry run" if dry_run else "apply"
        try:
            config = await asyncio.to_thread(parse_selection, selection)
            async with self._locked(f"the {verb} of {shown(selection.name)}"):
                outcome = await self._apply(selection, config, dry_run, force, forced_by)
        except Refused as exc:
            log.warning("MIG %s of %s refused: %s", verb, shown(selection.name), exc)
            outcome = Outcome(
                "failed",
                steps=exc.steps,
                message=str(exc),
                error_kind=exc.kind,
                in_use_by=exc.in_use_by,
            )
        return outcome

    async def _apply(
        self,
        selection: Selection,
        config: LayoutFile,
        dry_run: bool,
        force: bool,
        forced_by: str,
    ) -> Outcome:
        states = await self.read_states()
        # Planning takes milliseconds; kubelet's calls should not wait for them.
        planned = await asyncio.to_thread(
            compute_plan,
            config,
            selection.name,
            self.node.gpus(),
            states,
            self.node.mig_strategy(),
        )
        steps = planned.steps
        if not steps:
            if not dry_run:
                self.store.select(selection)
                journal = self.store.journal()
                if journal is not None and journal.status == "running":
                    # Died after its last mutation: the GPUs are done, only the record is not.
                    self.store.record(dataclasses.replace(journal, status="done"))
            return Outcome(
                "unchanged", message=f"layout {shown(selection.name)} is already applied"
            )
        skipped: list[str] = []
        if planned.strategy_problem:
            if not force:
                raise Refused(
                    f"layout {shown(selection.name)} would leave GPUs that "
                    f"devicePlugin.migStrategy single cannot advertise: "
                    f"{planned.strategy_problem}; nothing was changed. Choose a layout with "
                    "one profile on every GPU, or use --force to apply it anyway (kubelet then "
                    "keeps only what is left of the old devices until the layout or the "
                    "strategy changes)",
                    "refused",
                    steps=steps,
                )
            skipped.append(
                f"migStrategy single cannot advertise the result ({planned.strategy_problem})"
            )
        if dry_run:
            note = "".join(f"; --force: {s}" for s in skipped)
            return Outcome("planned", steps=steps, message=f"{len(steps)} NVML calls needed{note}")
        hit = affected_uuids(steps, states)
        # A plan of creations only takes nothing anyone holds: there is nobody to ask.
        takes_away = any(hit.values())
        if takes_away and force:
            skipped.append("pods (kubelet) and processes using the devices were not checked")
        elif takes_away:
            await self._check_unused(hit, states)
        notes = [f"{forced_by}: {s}" for s in skipped]
        return await self._run(selection, steps, hit, states, notes)

    async def _check_unused(
        self, hit: Mapping[int, set[str]], states: Mapping[int, MigLayoutState]
    ) -> None:
        users: list[str] = []
        socket = self.node.pod_resources_socket()
        try:
            device_users = await list_device_users(socket, PODRESOURCES_TIMEOUT_S)
        except PodResourcesUnavailable as exc:
            kubelet = self.node.kubelet_found()
            if kubelet is not None:
                # Containers keep running while kubelet restarts or is down: not being able to
                # ask is no evidence that nobody uses the devices.
                raise Refused(
                    f"kubelet is installed ({kubelet} exists) but gpud cannot ask it which pods "
                    f"use the GPUs: {exc}. Nothing was changed. Start kubelet (or point "
                    "paths.podResourcesSocket at its pod-resources/kubelet.sock) and apply "
                    "again, or use --force to apply without asking",
                    "refused",
                ) from None
            log.info("no kubelet on this node (%s); checking NVML's processes only", exc)
            device_users = {}
        for index, uuids in sorted(hit.items()):
            for uuid, who in sorted(users_of(device_users, uuids).items()):
                users += [f"{w} uses {uuid} (GPU {index})" for w in who]
            procs = await asyncio.to_thread(self.backend.processes, index)
            whole = states[index].uuid in uuids
            for p in procs:
                if (p.mig_uuid is None and whole) or (
                    p.mig_uuid is not None and p.mig_uuid in uuids
                ):
                    users.append(
                        f"process {p.pid} uses {p.mig_uuid or states[index].uuid} (GPU {index})"
                    )
        if users:
            raise Refused(
                "the layout change would take devices away from running work; nothing was "
                "changed. Stop these, or use --force:\n" + "\n".join(f"  {u}" for u in users),
                "refused",
                users,
            )

    async def _run(
        self,
        selection: Selection,
        steps: tuple[Step, ...],
        hit: Mapping[int, set[str]],
        states: Mapping[int, MigLayoutState],
        notes: Sequence[str] = (),
    ) -> Outcome:
        withdrawn = tuple(sorted(states[i].uuid for i in hit))
        journal = Journal(
            selection, "running", tuple(s.to_dict() for s in steps), 0, 0, "", withdrawn
        )
        self.store.record(journal)
        self.node.started(selection, steps, withdrawn)
        await self.node.withdraw(frozenset(withdrawn))
        created: dict[tuple[int, str], int] = {}
        mutations = 0
        try:
            for i, step in enumerate(steps):
                journal = dataclasses.replace(journal, next_step=i, mutations=mutations)
                self.store.record(journal)
                log.info(
                    "MIG step %d/%d: %s",
                    i + 1,
                    len(steps),
                    step.describe(),
                    extra={"STEP": step.kind, "GPU_INDEX": step.gpu},
                )
                await asyncio.to_thread(execute, self.backend, step, created)
                mutations += 1
        except HwError as exc:
            message = (
                f"{steps[i].describe()} failed: {exc}; {i} of {len(steps)} steps were done. "
                "`gpudctl mig show` lists what the GPUs hold now; fix the cause and apply again"
            )
            self.store.record(
                dataclasses.replace(
                    journal, status="failed", next_step=i, mutations=mutations, error=message
                )
            )
            log.error("%s", message)
            await self._settle(changed=mutations > 0)
            return Outcome("failed", mutations, steps, message, "error")
        self.store.record(
            dataclasses.replace(journal, status="done", next_step=len(steps), mutations=mutations)
        )
        self.store.select(selection)
        await self._settle(changed=True)
        name = shown(selection.name)
        log.info("MIG layout %s applied with %d NVML calls", name, mutations)
        for note in notes:
            log.warning("MIG layout %s applied; %s", name, note)
        message = "; ".join([f"layout {name} applied", *notes])
        return Outcome("applied", mutations, steps, message)

    async def _settle(self, changed: bool) -> None:
        # States first: the inventory refresh keeps the health of MIG devices that still exist.
        await self.read_states()
        await self.node.refreshed()
        if changed:
            await self.node.layout_changed()
        await self.node.withdraw(frozenset())

    async def recover(self, configured: Selection | None) -> None:
        """At start, before anything is advertised: finish an interrupted apply, or recreate the
        selected layout (instances do not survive a reboot), or apply the configured one."""
        try:
            await self._recover(configured)
        finally:
            self.recovered.set()

    async def _recover(self, configured: Selection | None) -> None:
        journal = self.store.journal()
        if journal is not None and journal.status == "running":
            log.warning(
                "finishing the MIG apply of %r interrupted before step %d of %d",
                journal.selection.name,
                journal.next_step + 1,
                len(journal.steps),
            )
            now = time.monotonic()
            outcome = await self._attempt(
                journal.selection, False, True, now, now, forced_by="finishing it"
            )
            self._log_outcome("resumed apply", outcome)
            return
        selection = self.store.selection() or configured
        if selection is None:
            return
        now = time.monotonic()
        outcome = await self._attempt(selection, False, False, now, now)
        self._log_outcome(f"layout {selection.name!r} at start", outcome)

    @staticmethod
    def _log_outcome(what: str, outcome: Outcome) -> None:
        if outcome.result == "failed":
            log.error("%s failed: %s", what, outcome.message)
        else:
            log.info("%s: %s (%d NVML calls)", what, outcome.result, outcome.mutations)


def execute(backend: MigBackend, step: Step, created: dict[tuple[int, str], int]) -> None:
    """Make the one NVML call ``step`` stands for. ``created`` maps (GPU, placement) of the GPU
    instances made so far in this plan to the IDs the driver gave them, for the ``create-ci``
    steps that follow (the planner cannot know those IDs)."""
    gpu = step.gpu
    if step.kind == "set-mig-mode":
        backend.set_mig_mode(gpu, bool(step.enabled))
    elif step.kind == "reset-gpu":
        backend.reset_gpu(gpu)
    elif step.kind == "destroy-ci":
        backend.destroy_compute_instance(gpu, _known(step.gi_id), _known(step.ci_id))
    elif step.kind == "destroy-gi":
        backend.destroy_gpu_instance(gpu, _known(step.gi_id))
    elif step.kind == "create-gi":
        assert step.placement is not None and step.profile_id is not None
        gi = backend.create_gpu_instance(gpu, step.profile_id, step.placement)
        created[(gpu, str(step.placement))] = gi.gi_id
    else:
        gi_id = step.gi_id
        if gi_id is None:
            gi_id = created[(gpu, str(step.placement))]
        backend.create_compute_instance(gpu, gi_id, _known(step.ci_profile_id))


def _known(value: int | None) -> int:
    assert value is not None, "the planner gives IDs for steps on existing instances"
    return value
