"""The catalog of simulated GPU boards and machines, and the parser for ``simulate:`` specs.

Pure data and pure functions, no state and no I/O. The board facts (product name, PCI device id,
total memory) are what NVML reports on the real board, because code above ``hw`` keys on them:
mig-parted's ``device-filter`` matches the PCI device id, node labels carry the product name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DRIVER_VERSION = "550.127.05"
CUDA_VERSION = "12.4"
NVML_VERSION = "12.550.127.05"

MAX_GPUS = 16
"""The largest COUNT a ``MODEL:COUNT`` spec accepts (an HGX-2 class machine)."""


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One board type as NVML describes it.

    ``mig_family`` is the board's key under ``gpus:`` in shared/reference/mig-profiles.yaml (None:
    no MIG), so MIG rules can be looked up per family. ``nvswitch_links`` is how many NVLinks an SXM
    board has to every peer through NVSwitch; 0 for PCIe boards, whose NVLink (when ``nvlink``)
    comes only from bridges a machine lists.
    """

    key: str
    product_name: str
    pci_device_id: int
    memory_mib: int
    mig_family: str | None
    nvlink: bool
    nvswitch_links: int = 0
    # CUDA compute capability, as nvmlDeviceGetCudaComputeCapability reports it.
    compute_capability: tuple[int, int] | None = None

    @property
    def mig_capable(self) -> bool:
        return self.mig_family is not None


MODELS: Mapping[str, GpuModel] = {
    model.key: model
    for model in (
        GpuModel(
            "a100-40gb", "NVIDIA A100-SXM4-40GB", 0x20B010DE, 40960, "A100-40GB", True, 12, (8, 0)
        ),
        GpuModel(
            "a100-80gb", "NVIDIA A100-SXM4-80GB", 0x20B210DE, 81920, "A100-80GB", True, 12, (8, 0)
        ),
        GpuModel(
            "h100-80gb", "NVIDIA H100 80GB HBM3", 0x233010DE, 81559, "H100-80GB", True, 18, (9, 0)
        ),
        GpuModel("h200", "NVIDIA H200", 0x233510DE, 143771, "H200-141GB", True, 18, (9, 0)),
        GpuModel("a30", "NVIDIA A30", 0x20B710DE, 24576, "A30-24GB", True, 0, (8, 0)),
        GpuModel("l4", "NVIDIA L4", 0x27B810DE, 23034, None, False, 0, (8, 9)),
        GpuModel("t4", "Tesla T4", 0x1EB810DE, 15360, None, False, 0, (7, 5)),
    )
}


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """Where one GPU sits in a machine: what NVML reports that belongs to the slot, not the board.

    ``nvlink_peers`` holds ``(peer index, links)`` ordered by peer index; the index and the minor
    number of the GPU are its position in :attr:`MachineSpec.gpus`.
    """

    model: GpuModel
    pci_bus_id: str
    numa_node: int | None
    pcie_switch: str | None
    nvlink_peers: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """A whole simulated machine; ``spec`` is its canonical name, which keys its state file."""

    spec: str
    gpus: tuple[GpuSlot, ...]


def _bus_id(bus: int) -> str:
    return f"00000000:{bus:02X}:00.0"


def _nvswitch(count: int, links: int) -> dict[tuple[int, int], int]:
    """Every GPU reaches every other with ``links`` NVLinks, as on an NVSwitch baseboard."""
    return {(a, b): links for a in range(count) for b in range(a + 1, count)}


def _build(
    spec: str,
    model: GpuModel,
    buses: Sequence[int],
    numa_nodes: Sequence[int | None],
    pcie_switches: Sequence[str | None],
    nvlinks: Mapping[tuple[int, int], int],
) -> MachineSpec:
    """Assemble a machine; ``nvlinks`` lists each connected pair once, the sides are filled in."""
    peers: list[list[tuple[int, int]]] = [[] for _ in buses]
    for (a, b), links in nvlinks.items():
        peers[a].append((b, links))
        peers[b].append((a, links))
    return MachineSpec(
        spec,
        tuple(
            GpuSlot(model, _bus_id(bus), numa, switch, tuple(sorted(links)))
            for bus, numa, switch, links in zip(
                buses, numa_nodes, pcie_switches, peers, strict=True
            )
        ),
    )


def _pairs(count: int) -> list[str]:
    """PCIe switch keys for GPUs that hang off a switch in pairs (0,1), (2,3), ..."""
    return [f"pcie-switch-{index // 2}" for index in range(count)]


MACHINES: Mapping[str, MachineSpec] = {
    machine.spec: machine
    for machine in (
        _build(
            "dgx-a100",
            MODELS["a100-40gb"],
            (0x07, 0x0F, 0x47, 0x4E, 0x87, 0x90, 0xB7, 0xBD),
            (0, 0, 0, 0, 1, 1, 1, 1),
            _pairs(8),
            _nvswitch(8, 12),
        ),
        # Each H100 on a DGX H100 shares its PCIe switch with its ConnectX-7, not with another GPU.
        _build(
            "dgx-h100",
            MODELS["h100-80gb"],
            (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB),
            (0, 0, 0, 0, 1, 1, 1, 1),
            [f"pcie-switch-{index}" for index in range(8)],
            _nvswitch(8, 18),
        ),
        # A PCIe server with two NVLink bridges; the boards sit on CPU root ports, no switch.
        _build(
            "a30x4",
            MODELS["a30"],
            (0x17, 0x31, 0xB1, 0xCA),
            (0, 0, 1, 1),
            (None,) * 4,
            {(0, 1): 4, (2, 3): 4},
        ),
        _build("l4x2", MODELS["l4"], (0x17, 0x31), (0, 0), (None, None), {}),
        _build("t4x1", MODELS["t4"], (0x3B,), (0,), (None,), {}),
    )
}


def _generated(model: GpuModel, count: int) -> MachineSpec:
    """``MODEL:COUNT``: two sockets, the first half of the GPUs on NUMA node 0.

    Bus ids are spread as on a two-socket server (node 1's devices above 0x80); SXM boards sit on
    an NVSwitch baseboard behind PCIe switches in pairs, PCIe boards on root ports with no NVLink.
    """
    half = (count + 1) // 2
    numa_nodes = [0 if index < half else 1 for index in range(count)]
    buses = [
        0x07 + 0x80 * node + 0x10 * (index - half * node) for index, node in enumerate(numa_nodes)
    ]
    sxm = model.nvswitch_links > 0
    return _build(
        f"{model.key}:{count}",
        model,
        buses,
        numa_nodes,
        _pairs(count) if sxm else [None] * count,
        _nvswitch(count, model.nvswitch_links) if sxm else {},
    )


_MODEL_COUNT = re.compile(r"(?P<model>[a-z0-9-]+):(?P<count>[0-9]+)")


def _usage() -> str:
    return (
        f"use one of the machines {', '.join(MACHINES)}, or MODEL:COUNT with MODEL one of "
        f"{', '.join(MODELS)} and COUNT 1-{MAX_GPUS} (e.g. h100-80gb:4)"
    )


def parse_spec(spec: str) -> MachineSpec:
    """The machine a ``simulate:`` value names; case and surrounding blanks do not matter.

    Raises ValueError saying what is wrong and what would be accepted, because the value comes
    from an operator's config file.
    """
    key = spec.strip().lower()
    if not key:
        raise ValueError(f"the simulated machine is empty; {_usage()}")
    machine = MACHINES.get(key)
    if machine is not None:
        return machine
    match = _MODEL_COUNT.fullmatch(key)
    if match is None:
        raise ValueError(f"unknown simulated machine {spec!r}; {_usage()}")
    model = MODELS.get(match["model"])
    if model is None:
        raise ValueError(f"unknown GPU model {match['model']!r} in {spec!r}; {_usage()}")
    digits = match["count"].lstrip("0")
    if not digits or len(digits) > 2 or int(digits) > MAX_GPUS:
        raise ValueError(f"GPU count {match['count']} in {spec!r} is out of range; {_usage()}")
    return _generated(model, int(digits))
