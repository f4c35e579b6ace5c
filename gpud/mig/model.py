"""An in-memory GPU that applies plan steps under NVML's MIG rules: the planner's dry run.

:func:`simulate` replays a plan on a :class:`MigLayoutState` and returns the state NVML would
report afterwards, or raises :class:`MigRuleError` (an :class:`HwError` of the kind NVML would
return) at the first step the driver would refuse. The tests run every plan through it, so a
plan that overlaps placements, passes a profile's count, creates into a GPU whose MIG mode is
still pending, or destroys a GI that still has CIs fails there, not on a node. gpud can run the
same check before touching a GPU.

The rules (mig-profiles.md §4, §7.3, §8), matching the simulated backend:

* GIs and CIs exist only while MIG is *currently* on; Ampere boards apply a mode change at the
  next reset (the mode stays pending), later boards at once; a reset applies the pending mode and
  drops every instance; MIG cannot be turned off while GIs exist.
* A GI sits at one of its profile's placements, shares no memory slice with another GI, and its
  profile's count is capped; GI IDs are the lowest free from 1.
* A CI starts at the lowest free multiple of its size within its GI; its profile's count per GI
  is capped; CI IDs are the lowest free from 0. A GI is destroyed only without CIs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace

from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.types import (
    CiProfile,
    ComputeInstance,
    GiProfile,
    GpuInstance,
    MigLayoutState,
    MigMode,
    MigState,
)
from gpud.mig.catalog import family_for
from gpud.mig.fit import ci_starts
from gpud.mig.planner import Step

_MIG_NAMESPACE = uuid.UUID("6f1b7f0e-3c55-4d2a-9a3e-2f43e1d5b0a1")


class MigRuleError(HwError):
    """A step NVML would refuse; ``step`` is the one, ``kind`` the NVML error it would return."""

    def __init__(self, kind: ErrorKind, message: str, step: Step) -> None:
        super().__init__(kind, f"{step.describe()}: {message}")
        self.step = step


_Fail = Callable[[ErrorKind, str], MigRuleError]
"""The error factory ``_Gpu.apply`` hands its helpers (it knows the step)."""


def catalog_state(
    pci_device_id: int, index: int = 0, gpu_uuid: str = "", enabled: bool = True
) -> MigLayoutState:
    """A GPU of a catalog family with no instances, MIG on or off: the blank page for tests, the
    layout generator, and dry runs for boards NVML cannot describe yet."""
    family = family_for(pci_device_id)
    if family is None:
        raise ValueError(f"PCI ID 0x{pci_device_id:08X} is not in the MIG catalog")
    mode = MigMode.ENABLED if enabled else MigMode.DISABLED
    return MigLayoutState(
        index,
        gpu_uuid or f"GPU-{index:08x}-0000-4000-8000-{pci_device_id:012x}",
        pci_device_id,
        MigState(mode, mode),
        family.profiles,
        (),
    )


def simulate(state: MigLayoutState, steps: Iterable[Step]) -> MigLayoutState:
    """The state after ``steps``; MigRuleError at the first step that breaks a rule."""
    gpu = _Gpu(state)
    for step in steps:
        gpu.apply(step)
    return replace(
        state,
        mode=gpu.mode,
        instances=tuple(sorted(gpu.instances.values(), key=lambda g: g.gi_id)),
    )


class _Gpu:
    """Mutable scratch copy of one GPU, private to :func:`simulate`."""

    def __init__(self, state: MigLayoutState) -> None:
        family = family_for(state.pci_device_id)
        self.state = state
        self.needs_reset = family.mode_change_needs_reset if family else False
        self.mode = state.mode
        self.instances = {gi.gi_id: gi for gi in state.instances}
        self.profiles = {p.profile_id: p for p in state.profiles}

    def apply(self, step: Step) -> None:
        def fail(kind: ErrorKind, message: str) -> MigRuleError:
            return MigRuleError(kind, message, step)

        if step.gpu != self.state.index:
            raise fail(ErrorKind.INVALID_ARGUMENT, f"this is GPU {self.state.index}")
        if not self.mode.capable:
            raise fail(ErrorKind.NOT_SUPPORTED, "the GPU cannot do MIG")
        if step.kind == "set-mig-mode":
            self.set_mode(step, fail)
        elif step.kind == "reset-gpu":
            self.mode = MigState(self.mode.pending, self.mode.pending)
            self.instances = {}
        elif self.mode.current is not MigMode.ENABLED:
            raise fail(ErrorKind.NOT_SUPPORTED, f"MIG mode is {self.mode.describe()}")
        elif step.kind == "create-gi":
            self.create_gi(step, fail)
        elif step.kind == "create-ci":
            self.create_ci(step, fail)
        elif step.kind == "destroy-ci":
            gi = self.find_gi(step, fail)
            if all(ci.ci_id != step.ci_id for ci in gi.compute_instances):
                raise fail(ErrorKind.NOT_FOUND, f"GPU instance {gi.gi_id} has no CI {step.ci_id}")
            cis = tuple(ci for ci in gi.compute_instances if ci.ci_id != step.ci_id)
            self.instances[gi.gi_id] = replace(gi, compute_instances=cis)
        elif step.kind == "destroy-gi":
            gi = self.find_gi(step, fail)
            if gi.compute_instances:
                raise fail(ErrorKind.IN_USE, f"it still has {len(gi.compute_instances)} CI(s)")
            del self.instances[gi.gi_id]
        else:
            raise fail(ErrorKind.INVALID_ARGUMENT, f"unknown step kind {step.kind!r}")

    def set_mode(self, step: Step, fail: _Fail) -> None:
        if step.enabled is None:
            raise fail(ErrorKind.INVALID_ARGUMENT, "no mode given")
        if not step.enabled and self.instances:
            raise fail(ErrorKind.IN_USE, f"{len(self.instances)} GPU instance(s) exist")
        want = MigMode.ENABLED if step.enabled else MigMode.DISABLED
        self.mode = MigState(self.mode.current, want) if self.needs_reset else MigState(want, want)

    def create_gi(self, step: Step, fail: _Fail) -> None:
        profile = self.profiles.get(step.profile_id) if step.profile_id is not None else None
        if profile is None:
            raise fail(ErrorKind.INVALID_ARGUMENT, f"no GI profile {step.profile_id}")
        if step.placement not in profile.placements:
            raise fail(ErrorKind.INVALID_ARGUMENT, f"{profile.name} cannot sit at {step.placement}")
        count = sum(1 for gi in self.instances.values() if gi.profile_id == profile.profile_id)
        if count >= profile.max_count:
            raise fail(
                ErrorKind.INSUFFICIENT_RESOURCES,
                f"{profile.name} allows {profile.max_count} instance(s) and {count} exist",
            )
        for gi in self.instances.values():
            if gi.placement.overlaps(step.placement):
                raise fail(
                    ErrorKind.INSUFFICIENT_RESOURCES,
                    f"overlaps GPU instance {gi.gi_id} at {gi.placement}",
                )
        gi_id = next(i for i in range(1, len(self.instances) + 2) if i not in self.instances)
        self.instances[gi_id] = GpuInstance(gi_id, profile.profile_id, step.placement)

    def create_ci(self, step: Step, fail: _Fail) -> None:
        gi = self.find_gi(step, fail)
        profile = self.profiles[gi.profile_id]
        ci_profile = _ci_profile(profile, step.ci_profile_id)
        if ci_profile is None:
            raise fail(ErrorKind.NOT_SUPPORTED, f"{profile.name} has no CI profile")
        count = sum(1 for c in gi.compute_instances if c.profile_id == ci_profile.profile_id)
        if count >= ci_profile.max_count:
            raise fail(
                ErrorKind.INSUFFICIENT_RESOURCES,
                f"{ci_profile.name} allows {ci_profile.max_count} per GPU instance",
            )
        taken = [(c.start, c.slices) for c in gi.compute_instances]
        starts = ci_starts(profile, [ci_profile], taken)
        if starts is None:
            raise fail(
                ErrorKind.INSUFFICIENT_RESOURCES,
                f"no free aligned compute slices for {ci_profile.name} in GPU instance {gi.gi_id}",
            )
        ids = {c.ci_id for c in gi.compute_instances}
        ci_id = next(i for i in range(len(ids) + 1) if i not in ids)
        mig_uuid = uuid.uuid5(_MIG_NAMESPACE, f"{self.state.uuid}/{gi.gi_id}/{ci_id}")
        ci = ComputeInstance(
            ci_id, ci_profile.profile_id, ci_profile.slices, starts[0], f"MIG-{mig_uuid}"
        )
        cis = tuple(sorted((*gi.compute_instances, ci), key=lambda c: c.ci_id))
        self.instances[gi.gi_id] = replace(gi, compute_instances=cis)

    def find_gi(self, step: Step, fail: _Fail) -> GpuInstance:
        """The GI a step names by ID, or (a GI created earlier in the plan) by placement; a step
        carrying both must agree, which catches a plan made from a stale state."""
        if step.gi_id is not None:
            gi = self.instances.get(step.gi_id)
            if gi is None:
                raise fail(ErrorKind.NOT_FOUND, f"no GPU instance {step.gi_id}")
            if step.placement is not None and gi.placement != step.placement:
                raise fail(
                    ErrorKind.INVALID_ARGUMENT,
                    f"GPU instance {gi.gi_id} sits at {gi.placement}, not {step.placement}",
                )
            return gi
        for gi in self.instances.values():
            if gi.placement == step.placement:
                return gi
        raise fail(ErrorKind.NOT_FOUND, f"no GPU instance at {step.placement}")


def _ci_profile(profile: GiProfile, ci_profile_id: int | None) -> CiProfile | None:
    for ci in profile.compute_profiles:
        if ci.profile_id == ci_profile_id:
            return ci
    return None
