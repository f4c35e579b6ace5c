"""Prepare's pure decisions and the checkpoint file, below the gRPC service."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.dra.checkpoint import Checkpoint, PreparedClaim, PreparedDevice
from gpud.dra.prepare import Allocated, ClaimError, allocated, in_use


def claim(results: list[dict[str, object]], uid: str = "u1") -> dict[str, object]:
    return {
        "metadata": {"namespace": "ns", "name": "c", "uid": uid},
        "status": {"allocation": {"devices": {"results": results}}},
    }


def test_only_this_drivers_results_are_taken_and_subrequests_map_to_their_request() -> None:
    got = allocated(
        claim(
            [
                {"request": "gpu/big", "driver": "gpu.nvidia.com", "pool": "n1", "device": "gpu-2"},
                {"request": "nic", "driver": "nic.example.com", "pool": "n1", "device": "nic-0"},
            ]
        ),
        "u1",
        "gpu.nvidia.com",
        "n1",
    )
    assert got == (Allocated("gpu", "n1", "gpu-2"),)


def test_a_device_of_another_pool_fails_the_claim() -> None:
    results = [{"request": "g", "driver": "gpu.nvidia.com", "pool": "n2", "device": "gpu-0"}]
    with pytest.raises(ClaimError, match="another node's pool, not n1: n2/gpu-0"):
        allocated(claim(results), "u1", "gpu.nvidia.com", "n1")


def test_an_unallocated_claim_fails() -> None:
    bare = {"metadata": {"namespace": "ns", "name": "c", "uid": "u1"}, "status": {}}
    with pytest.raises(ClaimError, match="ns/c is not allocated"):
        allocated(bare, "u1", "gpu.nvidia.com", "n1")


def test_a_device_prepared_for_another_claim_is_refused_unless_admin_access() -> None:
    prepared = {"other": ["gpu-1"], "u1": ["gpu-2"]}
    assert in_use(prepared, "u1", [Allocated("g", "n1", "gpu-1")]) == (
        "gpu-1 is already prepared for claim other"
    )
    assert in_use(prepared, "u1", [Allocated("g", "n1", "gpu-2")]) == ""
    assert in_use(prepared, "u1", [Allocated("g", "n1", "gpu-1", admin_access=True)]) == ""


def test_the_checkpoint_round_trips_and_a_damaged_one_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "dra-checkpoint.json"
    first = Checkpoint(path)
    device = PreparedDevice(("gpu",), "n1", "gpu-3", ("k8s.gpu.nvidia.com/claim=u1-gpu-3",))
    first.claims["u1"] = PreparedClaim("u1", "ns", "c", (device,))
    first.save()
    again = Checkpoint(path)
    assert again.load() == "" and again.claims == first.claims

    path.write_text(path.read_text().replace("gpu-3", "gpu-4"))  # edited outside gpud
    damaged = Checkpoint(path)
    problem = damaged.load()
    assert "checksum mismatch" in problem and damaged.claims == {}
    assert not path.exists()
    (aside,) = tmp_path.glob("dra-checkpoint.json.corrupt-*")
    assert "gpu-4" in aside.read_text()  # kept for the operator, not lost
