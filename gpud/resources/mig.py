"""MIG devices as kubelet sees them: one per compute instance, named by its MIG UUID.

:func:`mig_devices` is pure: it turns one GPU's MIG layout (as the hardware layer read it) into
:class:`MigDevice` values. The only host facts it needs beyond NVML, the capability device nodes
a container must be given for its GPU and compute instance, come from a ``caps`` function, so tests
pass a fake and the daemon passes :func:`caps_reader` over ``/proc``.

MIG index ``j`` (the ``i:j`` in ``Device.index``): a GPU's MIG devices ordered by the start of
their GPU instance's placement, then by the compute instance's start inside it (GI and CI IDs
break ties). That is the physical left-to-right order, so the index is the same however the
instances were created, and it is what ``deviceIDStrategy: index`` hands to the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gpud.hw.types import (
    NO_INSTANCE,
    ComputeInstance,
    GiProfile,
    GpuInfo,
    GpuInstance,
    MigLayoutState,
)

# (GPU minor number, GI ID, CI ID) -> the GI and CI capability device nodes, () when unknown.
CapsResolver = Callable[[int, int, int], tuple[str, ...]]

CAPS_PROC_DIR = "proc/driver/nvidia/capabilities"
CAPS_DEV_DIR = "/dev/nvidia-caps"


class MigLayoutError(ValueError):
    """The layout names a GPU-instance profile the GPU did not report: it cannot be named."""


@dataclass(frozen=True, slots=True)
class MigDevice:
    """One MIG device: a compute instance inside a GPU instance on a physical GPU."""

    gpu_index: int
    gpu_uuid: str
    # j in "i:j": position among this GPU's MIG devices (see the module docstring).
    mig_index: int
    uuid: str
    # The GI profile's name ("1g.5gb+me") when the CI spans its GI, else the CI's ("1c.3g.20gb").
    profile: str
    gi_id: int
    ci_id: int
    # The GPU instance's memory: every compute instance in a GI shares it.
    memory_mib: int
    numa_node: int | None
    # The parent GPU's /dev/nvidia<minor>, then the GI and CI capability nodes when known.
    device_paths: tuple[str, ...]
    # The CI spans its whole GI ("C == G"); only such devices get a mixed-strategy resource.
    spans_gi: bool

    @property
    def index(self) -> str:
        """nvidia-smi style ``"<gpu>:<mig>"``."""
        return f"{self.gpu_index}:{self.mig_index}"


def no_caps(minor: int, gi_id: int, ci_id: int) -> tuple[str, ...]:
    """A resolver that knows no capability nodes (the simulated backend, tests)."""
    return ()


def mig_devices(
    gpu: GpuInfo, state: MigLayoutState, caps: CapsResolver = no_caps
) -> tuple[MigDevice, ...]:
    """The MIG devices of ``gpu`` in layout ``state``, in MIG-index order.

    Raises MigLayoutError when a GPU instance's profile is not among ``state.profiles``: without
    it there is no name to advertise the device under.
    """
    profiles = {p.profile_id: p for p in state.profiles}
    found: list[tuple[tuple[int, int, int, int], GiProfile, GpuInstance, ComputeInstance]] = []
    for gi in state.instances:
        gi_profile = profiles.get(gi.profile_id)
        if gi_profile is None:
            raise MigLayoutError(
                f"GPU {gpu.index} ({gpu.uuid}): GPU instance {gi.gi_id} has profile ID "
                f"{gi.profile_id}, which the GPU did not report"
            )
        for ci in gi.compute_instances:
            key = (gi.placement.start, ci.start, gi.gi_id, ci.ci_id)
            found.append((key, gi_profile, gi, ci))
    found.sort(key=lambda item: item[0])

    devices = []
    for j, (_, gi_profile, gi, ci) in enumerate(found):
        spans = ci.slices == gi_profile.slices
        devices.append(
            MigDevice(
                gpu_index=gpu.index,
                gpu_uuid=gpu.uuid,
                mig_index=j,
                uuid=ci.mig_uuid,
                profile=gi_profile.name if spans else _ci_name(gi_profile, ci),
                gi_id=gi.gi_id,
                ci_id=ci.ci_id,
                memory_mib=gi_profile.memory_mib,
                numa_node=gpu.numa_node,
                device_paths=(gpu.device_path, *caps(gpu.minor_number, gi.gi_id, ci.ci_id)),
                spans_gi=spans,
            )
        )
    return tuple(devices)


def _ci_name(gi: GiProfile, ci: ComputeInstance) -> str:
    """The CI profile's reported name, else NVIDIA's "<c>c.<gi>" form built from the slices."""
    for profile in gi.compute_profiles:
        if profile.profile_id == ci.profile_id:
            return profile.name
    return f"{ci.slices}c.{gi.name}"


def mig_uuids_for_event(state: MigLayoutState, gi_id: int, ci_id: int) -> tuple[str, ...]:
    """The MIG devices an event scoped to (``gi_id``, ``ci_id``) concerns.

    ``()`` when the event is not MIG-scoped (``gi_id`` is NO_INSTANCE): it is the whole GPU's.
    A CI of NO_INSTANCE means every compute instance of the GI, as NVIDIA's plugin reads it.
    """
    if gi_id == NO_INSTANCE:
        return ()
    return tuple(
        ci.mig_uuid
        for gi in state.instances
        if gi.gi_id == gi_id
        for ci in gi.compute_instances
        if ci_id in (NO_INSTANCE, ci.ci_id)
    )


# ---- reading the capability nodes (effectful) ----------------------------------------------


def read_mig_caps(root: Path, minor: int, gi_id: int, ci_id: int) -> tuple[str, ...]:
    """The GI and CI capability device nodes of a MIG device, from the driver's procfs.

    The driver publishes ``<root>/proc/driver/nvidia/capabilities/gpu<minor>/mig/gi<gi>/access``
    and ``.../gi<gi>/ci<ci>/access``, each with a ``DeviceFileMinor: N`` line naming
    ``/dev/nvidia-caps/nvidia-cap<N>``; a container needs both nodes to open the MIG device.
    Returns the two paths (unprefixed: they are paths inside the container and on the host),
    or () when either file is absent or unreadable, so a caller never hands out half a device.
    """
    gi_dir = root / CAPS_PROC_DIR / f"gpu{minor}" / "mig" / f"gi{gi_id}"
    gi_minor = _device_file_minor(gi_dir / "access")
    ci_minor = _device_file_minor(gi_dir / f"ci{ci_id}" / "access")
    if gi_minor is None or ci_minor is None:
        return ()
    return (f"{CAPS_DEV_DIR}/nvidia-cap{gi_minor}", f"{CAPS_DEV_DIR}/nvidia-cap{ci_minor}")


def caps_reader(root: Path = Path("/")) -> CapsResolver:
    """A :data:`CapsResolver` reading the capability files under ``root``."""
    return partial(read_mig_caps, root)


def _device_file_minor(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "DeviceFileMinor":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None
