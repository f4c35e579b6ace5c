"""The node's GPUs and MIG devices as DRA devices, named and described as NVIDIA's driver does.

Claims and DeviceClasses written for NVIDIA's DRA driver select devices by name, by the
attributes under the driver's domain (``device.attributes['gpu.nvidia.com'].productName``) and
by capacity (``device.capacity['gpu.nvidia.com'].memory``); gpud publishes the same names and
values so that they select gpud's devices unchanged (shared/reference/dra.md §4.3, §4.4).

What is published is what exists, whatever ``device_plugin.migStrategy`` says: a GPU with MIG
off is a ``gpu`` device; a GPU with MIG on is only its MIG devices (``mig``), never itself, as a
GPU cut into instances cannot be handed out whole. The devices of a GPU whose layout is being
changed (``NodeState.withdrawn``) are left out until the new layout exists.

The API server rejects a whole ResourceSlice for one bad value, so every value is shaped here to
what it accepts (§3.3): versions as strict semver (``550.127.05`` becomes ``550.127.5``, ``12.4``
``12.4.0``), strings cut to 64 bytes, device names as DNS labels; a value that cannot be shaped
is left out rather than sent.

Unhealthy devices stay published, tainted ``NoSchedule`` (KEP-5055, beta and on in 1.36): the
scheduler allocates them to no new claim, the taint tells an operator why
(``kubectl get resourceslice -o yaml``), and claims already allocated to them keep naming a
device that exists. The taint keys are NVIDIA's (``<driver>/xid``, ``<driver>/gpu-lost``), so
tolerations written for NVIDIA's health checks apply; see docs/dra.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpud.hw.types import GpuInfo, MigMode
from gpud.labels.gfd import family
from gpud.node.state import DeviceState, MigInstance, MigLayout, NodeState

# The standard attribute domain for what every kind of device has (KEP-4381's registry).
STANDARD = "resource.kubernetes.io"
MAX_STRING_BYTES = 64
NO_SCHEDULE = "NoSchedule"

_SEMVER_CORE = re.compile(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?((?:\.\d+)*)")
_NOT_IN_LABEL = re.compile(r"[^a-z0-9-]")
_CRITICAL_XID = re.compile(r"critical XID (\d+)")


@dataclass(frozen=True, slots=True)
class Taint:
    """A device taint (``spec.devices[].taints[]``); ``value`` is "" when there is none."""

    key: str
    value: str = ""
    effect: str = NO_SCHEDULE

    def to_api(self) -> dict[str, str]:
        out = {"key": self.key, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        return out


@dataclass(frozen=True, slots=True)
class DraDevice:
    """One device as a ResourceSlice lists it. ``attributes`` and ``capacity`` are already in
    the API's shape (``{"productName": {"string": "NVIDIA A100-SXM4-40GB"}}``, ``{"memory":
    {"value": "40Gi"}}``); ``uuid`` and ``gpu_uuid`` say what it is on this node."""

    name: str
    uuid: str
    gpu_uuid: str
    attributes: Mapping[str, Mapping[str, Any]]
    capacity: Mapping[str, Mapping[str, str]]
    taints: tuple[Taint, ...] = field(default=())

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "attributes": {k: dict(v) for k, v in self.attributes.items()},
            "capacity": {k: dict(v) for k, v in self.capacity.items()},
        }
        if self.taints:
            out["taints"] = [t.to_api() for t in self.taints]
        return out


def semver(text: str) -> str | None:
    """``text`` as a semver 2.0.0 version the API server accepts, or None when it holds none.

    Missing parts are zero (``12.4`` -> ``12.4.0``), leading zeros go (``05`` -> ``5``), parts
    past the third become build metadata (``535.104.05.01`` -> ``535.104.5+01``), which keeps
    them visible but out of comparisons, as semver has it.
    """
    match = _SEMVER_CORE.fullmatch(text.strip())
    if match is None:
        return None
    major, minor, patch, rest = match.groups()
    core = ".".join(str(int(p or "0")) for p in (major, minor, patch))
    extra = rest.lstrip(".")
    return f"{core}+{extra}" if extra else core


def architecture(capability: tuple[int, int]) -> str:
    """NVIDIA's architecture name for a compute capability (``Ada Lovelace``): GFD's family
    (:func:`gpud.labels.gfd.family`) as a name; "" for one neither knows."""
    name = family(*capability)
    return "" if name == "undefined" else name.replace("-", " ").title()


def binary_quantity(mib: int) -> str:
    """Memory as the binary quantity the API server keeps (``40960`` MiB -> ``40Gi``)."""
    for suffix, unit in (("Ti", 1 << 20), ("Gi", 1 << 10)):
        if mib and mib % unit == 0:
            return f"{mib // unit}{suffix}"
    return f"{mib}Mi"


def pci_bus_id(nvml_bus_id: str) -> str:
    """NVML's ``00000000:07:00.0`` as the standard attribute has it: ``0000:07:00.0``, lower
    case (the form in sysfs)."""
    domain, _, rest = nvml_bus_id.lower().partition(":")
    return f"{domain[-4:].rjust(4, '0')}:{rest}" if rest else nvml_bus_id.lower()


def _string(value: str) -> dict[str, str] | None:
    raw = value.encode()
    if not value:
        return None
    if len(raw) > MAX_STRING_BYTES:
        value = raw[:MAX_STRING_BYTES].decode(errors="ignore")
    return {"string": value}


def _version(value: str) -> dict[str, str] | None:
    shaped = semver(value) if value else None
    return {"version": shaped} if shaped else None


def _label(text: str) -> str:
    return _NOT_IN_LABEL.sub("", text.lower())


def gpu_name(gpu: GpuInfo) -> str:
    return f"gpu-{gpu.minor_number}"


def mig_name(gpu: GpuInfo, gi: MigInstance, ci_profile: str, ci_start: int | None) -> str:
    """NVIDIA's ``gpu-<minor>-mig-<profile>-<GI profile id>-<placement start>``: the profile
    with what a DNS label cannot hold removed (dots, and the ``+`` of ``1g.10gb+me``). A compute
    instance that is only part of its GPU instance (``1c.3g.20gb``) is named by its own profile
    and its start within the GI, so that the CIs of one GI differ."""
    base = f"gpu-{gpu.minor_number}-mig-{_label(ci_profile)}-{gi.profile_id}-{gi.placement.start}"
    return base if ci_start is None else f"{base}-{ci_start}"


def taints(device: DeviceState | None, gpu: GpuInfo, driver: str) -> tuple[Taint, ...]:
    """Why a device must not be allocated, as taints (empty when it is healthy)."""
    if gpu.lost:
        return (Taint(f"{driver}/gpu-lost"),)
    if device is None or device.healthy:
        return ()
    if device.reason.startswith("GPU lost"):
        return (Taint(f"{driver}/gpu-lost"),)
    xid = _CRITICAL_XID.search(device.reason)
    if xid is not None:
        return (Taint(f"{driver}/xid", xid.group(1)),)
    return (Taint(f"{driver}/unhealthy"),)


def _common(
    gpu: GpuInfo, state: NodeState, pcie_roots: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """What a GPU and its MIG devices share: the board, the driver, where it sits."""
    attrs: dict[str, dict[str, Any] | None] = {
        "productName": _string(gpu.name),
        "driverVersion": _version(state.system.driver_version),
        "cudaDriverVersion": _version(state.system.cuda_version),
    }
    if gpu.compute_capability is not None:
        major, minor = gpu.compute_capability
        attrs["architecture"] = _string(architecture(gpu.compute_capability))
        attrs["cudaComputeCapability"] = _version(f"{major}.{minor}")
    bus_id = pci_bus_id(gpu.pci_bus_id)
    attrs[f"{STANDARD}/pciBusID"] = _string(bus_id)
    root = pcie_roots.get(bus_id)
    if root:
        attrs[f"{STANDARD}/pcieRoot"] = _string(root)
    if gpu.numa_node is not None:
        attrs[f"{STANDARD}/numaNode"] = {"int": gpu.numa_node}
    return {k: v for k, v in attrs.items() if v is not None}


def _mig_devices(
    gpu: GpuInfo,
    layout: MigLayout,
    state: NodeState,
    driver: str,
    common: dict[str, dict[str, Any]],
) -> list[DraDevice]:
    out = []
    raw = {gi.gi_id: gi for gi in layout.raw.instances}
    for gi in layout.instances:
        ci_starts = {c.mig_uuid: c.start for c in raw[gi.gi_id].compute_instances}
        for ci in gi.compute_instances:
            whole = ci.profile == gi.profile
            name = mig_name(gpu, gi, ci.profile, None if whole else ci_starts.get(ci.mig_uuid, 0))
            capacity = {"memory": {"value": binary_quantity(gi.memory_mib)}}
            for index in range(gi.placement.start, gi.placement.start + gi.placement.size):
                capacity[f"memorySlice{index}"] = {"value": "1"}
            out.append(
                DraDevice(
                    name=name,
                    uuid=ci.mig_uuid,
                    gpu_uuid=gpu.uuid,
                    attributes={
                        "type": {"string": "mig"},
                        "uuid": {"string": ci.mig_uuid},
                        "parentUUID": {"string": gpu.uuid},
                        "profile": {"string": ci.profile},
                        **common,
                    },
                    capacity=capacity,
                    taints=taints(state.device(ci.mig_uuid), gpu, driver),
                )
            )
    return out


def dra_devices(
    state: NodeState, driver: str, pcie_roots: Mapping[str, str] | None = None
) -> tuple[DraDevice, ...]:
    """Every device this node offers through DRA, GPU by minor number, each GPU's MIG devices
    in placement order: the order the scheduler tries them in (first fit).

    ``pcie_roots`` maps a lower-case bus ID to its PCIe root (``pci0000:00``), read from sysfs
    by the caller; a GPU without one has no ``pcieRoot``.
    """
    roots = pcie_roots or {}
    out: list[DraDevice] = []
    for gpu in sorted(state.gpus, key=lambda g: g.minor_number):
        if gpu.uuid in state.withdrawn:
            continue
        common = _common(gpu, state, roots)
        if gpu.mig.current is MigMode.ENABLED:
            layout = state.mig_layout(gpu.index)
            if layout is not None and layout.gpu_uuid == gpu.uuid:
                out.extend(_mig_devices(gpu, layout, state, driver, common))
            continue
        out.append(
            DraDevice(
                name=gpu_name(gpu),
                uuid=gpu.uuid,
                gpu_uuid=gpu.uuid,
                attributes={
                    "type": {"string": "gpu"},
                    "uuid": {"string": gpu.uuid},
                    **common,
                },
                capacity={"memory": {"value": binary_quantity(gpu.memory_mib)}},
                taints=taints(state.device(gpu.uuid), gpu, driver),
            )
        )
    return tuple(out)
