"""GPU Feature Discovery's node labels, computed from what gpud knows instead of by a second daemon.

:func:`gfd_labels` is pure: one :class:`LabelInputs` value in, the label map out, with GFD's names
and values (shared/reference/cluster-integration.md §2), so every nodeSelector written for GFD keeps
matching. Where GFD cannot decide, or gpud cannot know what GFD reads, gpud decides this way and
says so in :attr:`LabelSet.warnings` (docs/labels.md lists each):

* Several GPU models on one node: GFD writes every model's ``nvidia.com/gpu.*`` in Go map order, so
  the survivor is random. gpud picks one model: among models with a GPU that has MIG off (GFD's
  full-GPU labels always win over MIG-enabled ones), the one with most GPUs, then the one of the
  lowest GPU index.
* ``nvidia.com/gfd.timestamp`` is never set: it changes at every restart while nothing else does,
  which would rewrite the feature file and relabel the node for nothing.
* ``nvidia.com/gpu.clique`` and ``nvidia.com/vgpu.*`` are not set: gpud reads neither the NVLink
  fabric's clique nor vGPU guest state. ``nvidia.com/mps.capable`` is always ``false``: gpud
  refuses MPS sharing.
* A MIG attribute gpud does not know (an SM count the catalog lacks, encoder counts) is left out
  rather than written as 0. Under ``mixed``, MIG devices whose compute instance does not span its
  GPU instance get no ``mig-<profile>.*`` labels: gpud does not advertise them as resources.
* An unusable driver or CUDA version leaves out that group of labels instead of all labels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpud.config.models import MigStrategy, Sharing

DOMAIN = "nvidia.com"
GPU_RESOURCE = f"{DOMAIN}/gpu"
UNKNOWN = "unknown"

# Compute capability major -> architecture family (minor splits 7 and 8), as GFD names them.
_FAMILIES = {
    1: "tesla",
    2: "fermi",
    3: "kepler",
    5: "maxwell",
    6: "pascal",
    9: "hopper",
    10: "blackwell",
    12: "blackwell",
    13: "rubin",
}
# PCI base class and subclass (class >> 8) -> gpu.mode.
_MODES = {0x0302: "compute", 0x0300: "graphics"}
_NOT_SANITISED = re.compile(r"[^A-Za-z0-9\-_. ]")


@dataclass(frozen=True, slots=True)
class MigDeviceFacts:
    """One MIG device (a compute instance) as labels need it.

    ``profile`` is NVML's name: ``1g.10gb``, ``1g.5gb+me``, or ``1c.3g.20gb`` for a compute
    instance smaller than its GPU instance. ``memory_mib`` is the GPU instance's memory (NVML's
    ``memorySizeMB``). The engine counts are those the GPU instance shares among its compute
    instances; None where unknown.
    """

    profile: str
    memory_mib: int
    slices_gi: int
    slices_ci: int
    multiprocessors: int | None = None
    copy_engines: int | None = None
    decoders: int | None = None
    encoders: int | None = None
    jpeg_engines: int | None = None
    ofa_engines: int | None = None

    @property
    def spans_gi(self) -> bool:
        return self.slices_ci == self.slices_gi

    @property
    def resource_profile(self) -> str:
        """The profile as resource and label names spell it: ``+`` becomes ``.``."""
        return self.profile.replace("+", ".")


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """One physical GPU. ``mig_devices`` matter only while ``mig_enabled``; ``pci_class`` is the
    24-bit PCI class code (0x030200 for a 3D controller), None when unknown."""

    index: int
    name: str
    memory_mib: int
    compute_capability: tuple[int, int] | None = None
    mig_capable: bool = False
    mig_enabled: bool = False
    mig_devices: tuple[MigDeviceFacts, ...] = ()
    pci_class: int | None = None


@dataclass(frozen=True, slots=True)
class LabelInputs:
    """Everything the labels are computed from; two equal values give the same labels.

    ``driver_version`` and ``cuda_version`` are as :class:`gpud.hw.types.SystemInfo` has them
    ("550.127.05", "12.4"; "" when unknown). ``machine_type`` is the machine-type file's content
    (DMI's product name), None when it could not be read.
    """

    gpus: tuple[GpuFacts, ...]
    driver_version: str
    cuda_version: str
    mig_strategy: MigStrategy
    sharing: Sharing = field(default_factory=Sharing)
    machine_type: str | None = None


@dataclass(frozen=True)
class LabelSet:
    """Labels by name, and what an operator should hear about how they were made."""

    labels: Mapping[str, str]
    warnings: tuple[str, ...] = ()


def sanitise(text: str) -> str:
    """GFD's sanitising: drop characters outside ``[A-Za-z0-9-_. ]``, join the words with ``-``.

    ``NVIDIA GeForce RTX 4090`` -> ``NVIDIA-GeForce-RTX-4090``.
    """
    return "-".join(_NOT_SANITISED.sub("", text).split())


def family(major: int, minor: int) -> str:
    """The architecture family GFD names for a compute capability (``undefined`` if none)."""
    if major == 7:
        return "volta" if minor < 5 else "turing"
    if major == 8:
        return "ampere" if minor < 9 else "ada-lovelace"
    return _FAMILIES.get(major, "undefined")


def gfd_labels(inputs: LabelInputs) -> LabelSet:
    """GFD's labels for the node; none at all on a node without GPUs, as GFD does."""
    if not inputs.gpus:
        return LabelSet({})
    warnings: list[str] = []
    labels: dict[str, str] = {}
    labels[f"{DOMAIN}/gpu.machine"] = (
        UNKNOWN if inputs.machine_type is None else sanitise(inputs.machine_type)
    )
    labels |= _version_labels(inputs.driver_version, inputs.cuda_version, warnings)
    capable = any(g.mig_capable for g in inputs.gpus)
    labels[f"{DOMAIN}/mig.capable"] = "true" if capable else "false"
    labels[f"{DOMAIN}/mps.capable"] = "false"
    labels |= _full_gpu_labels(inputs.gpus, inputs.sharing, warnings)
    if inputs.mig_strategy is MigStrategy.SINGLE:
        labels[f"{DOMAIN}/mig.strategy"] = MigStrategy.SINGLE.value
        labels |= _single_labels(inputs.gpus, inputs.sharing, warnings)
    elif inputs.mig_strategy is MigStrategy.MIXED:
        labels[f"{DOMAIN}/mig.strategy"] = MigStrategy.MIXED.value
        labels |= _mixed_labels(inputs.gpus, inputs.sharing)
    labels[f"{DOMAIN}/gpu.mode"] = _mode(inputs.gpus)
    return LabelSet(labels, tuple(warnings))


# ---- versions --------------------------------------------------------------------------------


def _version_labels(driver: str, cuda: str, warnings: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    parts = driver.split(".")
    if 2 <= len(parts) <= 3:
        major, minor, revision = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
        for group in ("driver-version", "driver"):  # the second is GFD's deprecated spelling
            labels[f"{DOMAIN}/cuda.{group}.major"] = major
            labels[f"{DOMAIN}/cuda.{group}.minor"] = minor
        labels[f"{DOMAIN}/cuda.driver-version.revision"] = revision
        labels[f"{DOMAIN}/cuda.driver.rev"] = revision
        labels[f"{DOMAIN}/cuda.driver-version.full"] = driver
    else:
        warnings.append(
            f"driver version {driver!r} is not X.Y[.Z]: the nvidia.com/cuda.driver* labels "
            "are left out"
        )
    # The driver's CUDA version (NVML's integer, formatted M.m), not an installed CUDA runtime.
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)", cuda)
    if match:
        for group in ("runtime-version", "runtime"):
            labels[f"{DOMAIN}/cuda.{group}.major"] = str(int(match[1]))
            labels[f"{DOMAIN}/cuda.{group}.minor"] = str(int(match[2]))
        labels[f"{DOMAIN}/cuda.runtime-version.full"] = f"{int(match[1])}.{int(match[2])}"
    else:
        warnings.append(
            f"CUDA driver version {cuda!r} is not M.m: the nvidia.com/cuda.runtime* labels are "
            "left out"
        )
    return labels


# ---- resources: product, count, replicas, sharing ----------------------------------------------


def _replication(sharing: Sharing | None, resource: str) -> tuple[int, bool]:
    """GFD's replicas for ``resource`` and whether its product takes ``-SHARED``.

    ``sharing`` None is GFD's "sharing disabled" (a MIG-enabled GPU's full-GPU labels):
    replicas 0. Otherwise the configured count, or 1 for a resource not shared. A replicated
    resource is marked shared unless renamed: renamed replicas carry their own resource name.
    """
    if sharing is None:
        return 0, False
    time_slicing = sharing.time_slicing
    for entry in time_slicing.resources if time_slicing is not None else ():
        if entry.name == resource:
            renamed = entry.rename is not None or time_slicing.rename_by_default
            return entry.replicas, entry.replicas > 1 and not renamed
    return 1, False


def _resource_labels(
    resource: str,
    parts: Sequence[str],
    count: int,
    sharing: Sharing | None,
) -> dict[str, str]:
    """``<resource>.{product,count,replicas,sharing-strategy}`` (see :func:`_replication`)."""
    replicas, shared = _replication(sharing, resource)
    product = "-".join(sanitise(p) for p in parts if p)
    return {
        f"{resource}.product": product + ("-SHARED" if shared else ""),
        f"{resource}.count": str(count),
        f"{resource}.replicas": str(replicas),
        f"{resource}.sharing-strategy": "time-slicing" if replicas > 1 else "none",
    }


def _full_gpu_labels(
    gpus: Sequence[GpuFacts], sharing: Sharing, warnings: list[str]
) -> dict[str, str]:
    """``nvidia.com/gpu.*`` for one model (see the module docstring for which one)."""
    ordered = sorted(gpus, key=lambda g: g.index)
    counts = Counter(g.name for g in ordered)
    first: dict[str, GpuFacts] = {}
    for g in ordered:
        first.setdefault(g.name, g)
    mig_off = {g.name: g for g in reversed(ordered) if not g.mig_enabled}
    name = min(mig_off or counts, key=lambda n: (-counts[n], first[n].index))
    if len(counts) > 1:
        others = ", ".join(sorted(n for n in counts if n != name))
        warnings.append(
            f"several GPU models on this node: nvidia.com/gpu.* describes {name} "
            f"({counts[name]} GPUs), not {others}"
        )
    # GFD labels a model whose every GPU has MIG on without sharing (replicas 0): none of them
    # is served whole.
    gpu = mig_off.get(name, first[name])
    labels = _resource_labels(
        GPU_RESOURCE, [name], counts[name], sharing if name in mig_off else None
    )
    if gpu.memory_mib:
        labels[f"{GPU_RESOURCE}.memory"] = str(gpu.memory_mib)
    if gpu.compute_capability is not None and gpu.compute_capability[0] != 0:
        major, minor = gpu.compute_capability
        labels[f"{GPU_RESOURCE}.family"] = family(major, minor)
        labels[f"{GPU_RESOURCE}.compute.major"] = str(major)
        labels[f"{GPU_RESOURCE}.compute.minor"] = str(minor)
    return labels


# ---- MIG -------------------------------------------------------------------------------------


def _mig_resource_labels(
    resource: str,
    parent: GpuFacts,
    device: MigDeviceFacts,
    count: int,
    sharing: Sharing,
) -> dict[str, str]:
    labels = _resource_labels(
        resource, [parent.name, "MIG", device.resource_profile], count, sharing
    )
    attributes = {
        "memory": device.memory_mib,
        "multiprocessors": device.multiprocessors,
        "slices.gi": device.slices_gi,
        "slices.ci": device.slices_ci,
        "engines.copy": device.copy_engines,
        "engines.decoder": device.decoders,
        "engines.encoder": device.encoders,
        "engines.jpeg": device.jpeg_engines,
        "engines.ofa": device.ofa_engines,
    }
    labels |= {f"{resource}.{k}": str(v) for k, v in attributes.items() if v is not None}
    return labels


def _mig_devices(gpus: Sequence[GpuFacts]) -> list[tuple[GpuFacts, MigDeviceFacts]]:
    """Every MIG device of a MIG-enabled GPU, by GPU index then in the GPU's own order."""
    return [
        (g, d) for g in sorted(gpus, key=lambda g: g.index) if g.mig_enabled for d in g.mig_devices
    ]


def _single_labels(
    gpus: Sequence[GpuFacts], sharing: Sharing, warnings: list[str]
) -> dict[str, str]:
    """Under ``single`` every MIG device is ``nvidia.com/gpu``: its labels replace the GPU's.

    A node ``single`` cannot describe (a MIG-enabled GPU without MIG devices, GPUs with MIG on
    and off, several profiles) gets GFD's ``<model>-MIG-INVALID`` labels with counts of 0.
    """
    enabled = sorted((g for g in gpus if g.mig_enabled), key=lambda g: g.index)
    if not enabled:
        return {}
    devices = _mig_devices(gpus)
    profiles = sorted({d.resource_profile for _, d in devices})
    reason = ""
    if any(not g.mig_devices for g in enabled):
        reason = "a GPU has MIG enabled but no MIG devices"
    elif len(enabled) != len(gpus):
        reason = "GPUs with MIG enabled and disabled"
    elif len(profiles) != 1:
        reason = f"more than one MIG profile ({', '.join(profiles)})"
    if reason:
        warnings.append(
            f"migStrategy single cannot describe this node ({reason}): nvidia.com/gpu.product "
            "is <model>-MIG-INVALID with a count of 0, as GPU Feature Discovery labels it"
        )
        return {
            f"{GPU_RESOURCE}.product": "-".join(
                sanitise(p) for p in (enabled[0].name, "MIG", "INVALID")
            ),
            f"{GPU_RESOURCE}.count": "0",
            f"{GPU_RESOURCE}.replicas": "0",
            f"{GPU_RESOURCE}.sharing-strategy": "",
            f"{GPU_RESOURCE}.memory": "0",
        }
    parent, device = devices[0]
    return _mig_resource_labels(GPU_RESOURCE, parent, device, len(devices), sharing)


def _mixed_labels(gpus: Sequence[GpuFacts], sharing: Sharing) -> dict[str, str]:
    """Under ``mixed`` each profile is ``nvidia.com/mig-<profile>`` with its own labels.

    Only MIG devices whose compute instance spans its GPU instance count: those are the ones
    gpud advertises (gpud.resources.sets).
    """
    by_profile: dict[str, list[tuple[GpuFacts, MigDeviceFacts]]] = {}
    for parent, device in _mig_devices(gpus):
        if device.spans_gi:
            by_profile.setdefault(device.resource_profile, []).append((parent, device))
    labels: dict[str, str] = {}
    for profile, found in by_profile.items():
        parent, device = found[0]
        resource = f"{DOMAIN}/mig-{profile}"
        labels |= _mig_resource_labels(resource, parent, device, len(found), sharing)
    return labels


def _mode(gpus: Sequence[GpuFacts]) -> str:
    """``compute`` or ``graphics`` when every GPU's PCI class says so, else ``unknown``."""
    modes = {_MODES.get(g.pci_class >> 8) if g.pci_class is not None else None for g in gpus}
    if len(modes) == 1:
        (mode,) = modes
        if mode is not None:
            return mode
    return UNKNOWN
