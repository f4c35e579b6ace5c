"""The MIG controller in process: the hooks it owes the daemon (on the simulated backend), and
how it plans a node (pure)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpud.config.models import MigStrategy
from gpud.daemon.mig import MigController, Node, Refused, compute_plan, read_selection
from gpud.hw.sim.backend import SimBackend
from gpud.hw.types import MIG_UNSUPPORTED, GpuInfo, MigMode, MigState
from gpud.mig.layout import parse
from gpud.mig.model import catalog_state
from gpud.mig.store import MigStore


def test_layout_changes_are_announced_once_and_a_no_op_is_not(tmp_path: Path) -> None:
    backend = SimBackend("a100-40gb:1", tmp_path / "state")
    backend.open()
    calls: list[str] = []

    async def withdraw(uuids: frozenset[str]) -> None:
        calls.append(f"withdraw {len(uuids)}")

    async def refreshed() -> None:
        calls.append("refreshed")

    async def changed() -> None:
        calls.append("layout changed")

    node = Node(
        gpus=backend.gpus,
        pod_resources_socket=lambda: tmp_path / "no-kubelet.sock",
        kubelet_found=lambda: None,
        mig_strategy=lambda: MigStrategy.MIXED,
        withdraw=withdraw,
        refreshed=refreshed,
        layout_changed=changed,
    )
    mig = MigController(backend, MigStore(tmp_path / "state"), node)
    mig.recovered.set()
    selection = read_selection("all-1g.5gb", None, "", None)

    async def scenario() -> None:
        first = await mig.apply(selection, dry_run=False, force=False)
        assert first.result == "applied" and first.mutations == 16
        assert calls == ["withdraw 1", "refreshed", "layout changed", "withdraw 0"]
        calls.clear()
        again = await mig.apply(selection, dry_run=False, force=False)
        assert again.result == "unchanged"
        assert calls == []

    asyncio.run(scenario())


# ---- planning a node: GPUs without MIG (pure) ---------------------------------------------------

A100, L4 = 0x20B010DE, 0x27B810DE


def board(index: int, pci: int, mig: MigState) -> GpuInfo:
    bus = f"00000000:{index:02X}:00.0"
    return GpuInfo(index, f"GPU-{index}", "board", bus, pci, 1, index, 0, mig)


def test_a_gpu_without_mig_is_skipped_or_refused_as_mig_parted_does() -> None:
    a100 = board(0, A100, MigState(MigMode.DISABLED, MigMode.DISABLED))
    l4 = board(1, L4, MIG_UNSUPPORTED)
    states = {0: catalog_state(A100, 0, "GPU-0", enabled=False)}
    config = parse(
        "version: v1\nmig-configs:\n"
        "  enable:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {1g.5gb: 7}\n"
        "  disable:\n    - devices: all\n      mig-enabled: false\n"
        "  named:\n    - devices: [1]\n      mig-enabled: true\n      mig-devices: {}\n"
    )
    # devices: all beside a MIG GPU: the L4 is left alone.
    steps = compute_plan(config, "enable", [a100, l4], states).steps
    assert steps and {s.gpu for s in steps} == {0}
    assert compute_plan(config, "disable", [a100, l4], states).steps == ()
    assert compute_plan(config, "disable", [l4], {}).steps == ()
    # Named, or with no MIG GPU on the node to turn MIG on for: refused, saying why.
    for name, gpus, st in (("named", [a100, l4], states), ("enable", [l4], {})):
        with pytest.raises(Refused) as err:
            compute_plan(config, name, gpus, st)
        assert err.value.kind == "invalid"
        assert "GPU 1 (GPU-1, PCI 0x27B810DE): MIG is not supported on this GPU" in str(err.value)
