"""The MIG controller in process, on the simulated backend: the hooks it owes the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gpud.config.models import MigStrategy
from gpud.daemon.mig import MigController, Node, read_selection
from gpud.hw.sim.backend import SimBackend
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
