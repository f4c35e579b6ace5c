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
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpud.hw.backend import MigBackend
from gpud.hw.errors import HwError
from gpud.hw.types import GpuInfo, MigLayoutState
from gpud.k8s.podresources import PodResourcesUnavailable, list_device_users, users_of
from gpud.mig import layout
from gpud.mig.fit import FitError, resolve
from gpud.mig.planner import Step, plan
from gpud.mig.store import Journal, MigStore, Selection

log = logging.getLogger(__name__)

PODRESOURCES_TIMEOUT_S = 10.0
BUNDLED_SOURCE = "gpud's bundled layouts"


@dataclass(frozen=True)
class Outcome:
    """What an apply did; ``result`` is applied, unchanged, planned (dry run) or failed."""

    result: str
    mutations: int = 0
    steps: tuple[Step, ...] = ()
    message: str = ""
    # invalid (the layout is wrong or does not fit), refused (in use), error (a step failed)
    error_kind: str = ""
    in_use_by: tuple[str, ...] = ()


class Refused(Exception):
    def __init__(self, message: str, kind: str, in_use_by: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.in_use_by = tuple(in_use_by)


@dataclass
class Node:
    """The daemon's view the controller reads and the hooks it calls; kept narrow on purpose."""

    gpus: Callable[[], Sequence[GpuInfo]]
    pod_resources_socket: Callable[[], Path]
    # Withdraw (or, with an empty set, restore) the devices of these physical GPUs and wait
    # until kubelet has been told.
    withdraw: Callable[[frozenset[str]], Awaitable[None]]
    # Re-read the inventory and MIG states after a change and re-advertise.
    refreshed: Callable[[], Awaitable[None]]
    # Called once after an apply that changed the GPUs (MIG device names in the CDI spec are
    # stale from then on).
    layout_changed: Callable[[], Awaitable[None]]
    states: dict[int, MigLayoutState] = field(default_factory=dict)


def read_selection(name: str, text: str, source: str, config_file: Path | None) -> Selection:
    """The layout source for a request: the text sent, else the configured file, else bundled."""
    if text:
        return Selection(name, text, source or "<request>")
    if config_file is not None:
        try:
            return Selection(name, config_file.read_text(encoding="utf-8"), str(config_file))
        except (OSError, UnicodeDecodeError) as exc:
            raise Refused(f"cannot read mig.configFile {config_file}: {exc}", "invalid") from None
    return Selection(name, layout.bundled_text(), BUNDLED_SOURCE)


def compute_plan(
    selection: Selection, gpus: Sequence[GpuInfo], states: Mapping[int, MigLayoutState]
) -> tuple[Step, ...]:
    """All steps for the node, GPU by GPU; raises Refused('invalid') before anything changes."""
    try:
        config = layout.parse(selection.text, selection.source)
        targets = layout.select(config, selection.name, [(g.index, g.pci_device_id) for g in gpus])
    except layout.LayoutError as exc:
        raise Refused(str(exc), "invalid") from None
    if not targets:
        raise Refused(
            f"layout {selection.name!r} in {selection.source} matches no GPU on this node",
            "invalid",
        )
    problems: list[str] = []
    steps: list[Step] = []
    for index in sorted(targets):
        target = targets[index]
        state = states.get(index)
        if state is None:
            problems.append(f"GPU {index}: cannot read its MIG state")
            continue
        resolved = resolve(target, state)
        if isinstance(resolved, FitError):
            if resolved.mig_unsupported and not target.enabled:
                continue  # a layout that disables MIG leaves GPUs without MIG alone
            problems.append(str(resolved))
            continue
        steps.extend(plan(state, resolved))
    if problems:
        raise Refused(
            f"layout {selection.name!r} does not fit this node; nothing was changed:\n"
            + "\n".join(f"  {p}" for p in problems),
            "invalid",
        )
    return tuple(steps)


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
        # Set once start-up recovery is over: MIG calls from the control API wait for it, so
        # nobody sees (or changes) a layout that is still being restored.
        self.recovered = asyncio.Event()

    async def read_states(self) -> dict[int, MigLayoutState]:
        """Read the MIG state of every MIG-capable GPU (in a thread: NVML blocks)."""

        def read() -> dict[int, MigLayoutState]:
            states = {}
            for gpu in self.node.gpus():
                if gpu.mig.capable and not gpu.lost:
                    states[gpu.index] = self.backend.mig_state(gpu.index)
            return states

        self.node.states = await asyncio.to_thread(read)
        return self.node.states

    async def apply(self, selection: Selection, dry_run: bool, force: bool) -> Outcome:
        await self.recovered.wait()
        return await self._apply_locked(selection, dry_run, force)

    async def current_states(self) -> dict[int, MigLayoutState]:
        """The MIG states as they are between applies (never half-way through one)."""
        await self.recovered.wait()
        async with self._lock:
            return await self.read_states()

    async def _apply_locked(self, selection: Selection, dry_run: bool, force: bool) -> Outcome:
        async with self._lock:
            try:
                return await self._apply(selection, dry_run, force)
            except Refused as exc:
                log.warning("MIG apply of %r refused: %s", selection.name, exc)
                return Outcome(
                    "failed", message=str(exc), error_kind=exc.kind, in_use_by=exc.in_use_by
                )

    async def _apply(self, selection: Selection, dry_run: bool, force: bool) -> Outcome:
        states = await self.read_states()
        # Parsing and planning take milliseconds; kubelet's calls should not wait for them.
        steps = await asyncio.to_thread(compute_plan, selection, self.node.gpus(), states)
        if not steps:
            if not dry_run:
                self.store.select(selection)
                journal = self.store.journal()
                if journal is not None and journal.status == "running":
                    # Died after its last mutation: the GPUs are done, only the record is not.
                    self.store.record(dataclasses.replace(journal, status="done"))
            return Outcome("unchanged", message=f"layout {selection.name!r} is already applied")
        if dry_run:
            return Outcome("planned", steps=steps, message=f"{len(steps)} NVML calls needed")
        hit = affected_uuids(steps, states)
        if not force:
            await self._check_unused(hit, states)
        return await self._run(selection, steps, hit, states)

    async def _check_unused(
        self, hit: Mapping[int, set[str]], states: Mapping[int, MigLayoutState]
    ) -> None:
        users: list[str] = []
        socket = self.node.pod_resources_socket()
        try:
            device_users = await list_device_users(socket, PODRESOURCES_TIMEOUT_S)
        except PodResourcesUnavailable as exc:
            if not exc.missing:
                raise Refused(
                    f"cannot ask kubelet which pods use the GPUs ({exc}); nothing was changed. "
                    "Retry, or use --force to apply without asking",
                    "refused",
                ) from None
            log.info("no kubelet PodResources socket at %s: no pods to protect", socket)
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
    ) -> Outcome:
        withdrawn = tuple(sorted(states[i].uuid for i in hit))
        journal = Journal(
            selection, "running", tuple(s.to_dict() for s in steps), 0, 0, "", withdrawn
        )
        self.store.record(journal)
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
        log.info("MIG layout %r applied with %d NVML calls", selection.name, mutations)
        return Outcome("applied", mutations, steps, f"layout {selection.name!r} applied")

    async def _settle(self, changed: bool) -> None:
        await self.node.refreshed()
        await self.read_states()
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
            outcome = await self._apply_locked(journal.selection, dry_run=False, force=True)
            self._log_outcome("resumed apply", outcome)
            return
        selection = self.store.selection() or configured
        if selection is None:
            return
        outcome = await self._apply_locked(selection, dry_run=False, force=False)
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
