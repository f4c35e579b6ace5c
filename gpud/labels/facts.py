"""The labels' inputs, from what gpud already holds: the hardware snapshot, the MIG layouts, the
configuration, and two host facts read here (DMI's product name, each GPU's PCI class).

:func:`label_inputs` is pure. The MIG device attributes GFD reads from NVML's
``nvmlDeviceGetAttributes`` (SMs, engine counts) come from the MIG profile catalog
(gpud.mig.catalog), keyed by board; the GPU instance's memory comes from the layout NVML reported,
which follows the driver.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from gpud.config.models import MigStrategy, Sharing
from gpud.hw.types import GpuInfo, MigLayoutState, MigMode, SystemInfo
from gpud.labels.gfd import GpuFacts, LabelInputs, MigDeviceFacts
from gpud.mig.catalog import family_for
from gpud.resources.mig import MigLayoutError, mig_devices

log = logging.getLogger(__name__)

MACHINE_TYPE_FILE = Path("/sys/class/dmi/id/product_name")
PCI_DEVICES_DIR = Path("/sys/bus/pci/devices")


def label_inputs(
    system: SystemInfo,
    gpus: Sequence[GpuInfo],
    mig_states: Mapping[int, MigLayoutState],
    mig_strategy: MigStrategy,
    sharing: Sharing,
    machine_type: str | None = None,
    pci_classes: Mapping[str, int] | None = None,
) -> LabelInputs:
    """The inputs for :func:`gpud.labels.gfd.gfd_labels`.

    ``mig_states`` maps a GPU index to its MIG layout (needed for GPUs with MIG on; one that does
    not belong to the GPU at that index is ignored, as is a layout naming a profile the GPU did
    not report, which the resource plan already reports). ``pci_classes`` maps NVML's PCI bus ID
    to the class code (:func:`read_pci_classes`). A GPU lost before its name was ever read is
    left out: it has no model to count under.
    """
    classes = pci_classes or {}
    facts = []
    for gpu in sorted(gpus, key=lambda g: g.index):
        if not gpu.name:
            continue
        enabled = gpu.mig.current is MigMode.ENABLED
        devices: tuple[MigDeviceFacts, ...] = ()
        state = mig_states.get(gpu.index)
        if enabled and state is not None and state.uuid == gpu.uuid:
            with contextlib.suppress(MigLayoutError):
                devices = mig_device_facts(gpu, state)
        facts.append(
            GpuFacts(
                index=gpu.index,
                name=gpu.name,
                memory_mib=gpu.memory_mib,
                compute_capability=gpu.compute_capability,
                mig_capable=gpu.mig.capable,
                mig_enabled=enabled,
                mig_devices=devices,
                pci_class=classes.get(gpu.pci_bus_id),
            )
        )
    return LabelInputs(
        gpus=tuple(facts),
        driver_version=system.driver_version,
        cuda_version=system.cuda_version,
        mig_strategy=mig_strategy,
        sharing=sharing,
        machine_type=machine_type,
    )


def mig_device_facts(gpu: GpuInfo, state: MigLayoutState) -> tuple[MigDeviceFacts, ...]:
    """The MIG devices of one GPU in MIG-index order (gpud.resources.mig), with attributes.

    A compute instance shares its GPU instance's engines; its SM count is known only when it spans
    the GPU instance (the catalog lists SMs per GPU-instance profile, and SMs are not spread evenly
    over compute slices: an H100 1g has 16, its 3g 60). Raises MigLayoutError for a GPU instance
    whose profile the GPU did not report.
    """
    profiles = {p.profile_id: p for p in state.profiles}
    slices = {
        (gi.gi_id, ci.ci_id): (profiles[gi.profile_id], ci.slices)
        for gi in state.instances
        if gi.profile_id in profiles
        for ci in gi.compute_instances
    }
    family = family_for(gpu.pci_device_id)
    out = []
    for device in mig_devices(gpu, state):
        gi_profile, ci_slices = slices[(device.gi_id, device.ci_id)]
        attributes = family.attributes(gi_profile.name, gpu.pci_device_id) if family else None
        spans = ci_slices == gi_profile.slices
        out.append(
            MigDeviceFacts(
                profile=device.profile,
                memory_mib=device.memory_mib,
                slices_gi=gi_profile.slices,
                slices_ci=ci_slices,
                multiprocessors=attributes.multiprocessors if attributes and spans else None,
                copy_engines=attributes.copy_engines if attributes else None,
                decoders=attributes.decoders if attributes else None,
                jpeg_engines=attributes.jpeg_engines if attributes else None,
                ofa_engines=attributes.ofa_engines if attributes else None,
            )
        )
    return tuple(out)


# ---- host facts (effectful) ----------------------------------------------------------------


def read_machine_type(path: Path = MACHINE_TYPE_FILE) -> str | None:
    """DMI's product name (GFD's machine-type file); None when it cannot be read (GFD's
    ``unknown``), which is normal in some VMs and containers."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        log.debug("machine type not readable from %s: %s", path, exc)
        return None


def sysfs_address(bus_id: str) -> str:
    """NVML's ``00000000:07:00.0`` as sysfs names the device: ``0000:07:00.0``."""
    domain, _, rest = bus_id.lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}"


def read_pci_classes(bus_ids: Iterable[str], devices: Path = PCI_DEVICES_DIR) -> dict[str, int]:
    """Each GPU's PCI class code (``0x030200``) from sysfs, by NVML bus ID; GPUs whose class
    cannot be read are missing (their ``gpu.mode`` is unknown)."""
    found: dict[str, int] = {}
    for bus_id in bus_ids:
        try:
            text = (devices / sysfs_address(bus_id) / "class").read_text(encoding="ascii")
            found[bus_id] = int(text.strip(), 16)
        except (OSError, ValueError) as exc:
            log.debug("PCI class of %s not readable: %s", bus_id, exc)
    return found
