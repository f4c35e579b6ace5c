"""NVIDIA's MIG profile tables as shared/reference/mig-profiles.yaml states them, read here on
their own, so that what the simulated backend, the fake NVML library and the NVML backend report
is checked against the reference and not against gpud/mig/catalog.json, the tables they were
built from (a test comparing a thing with itself cannot fail).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import yaml

from gpud.hw.types import GiProfile
from tests.conftest import shared_reference


@cache
def _families() -> dict[str, Any]:
    return yaml.safe_load(shared_reference("mig-profiles.yaml").read_text())["gpus"]


def described(profiles: Sequence[GiProfile], family: str) -> list[dict[str, Any]]:
    """``profiles`` in the reference's terms, field by field, for a comparison that shows what
    differs; memory only where the reference states one (it leaves some unobserved)."""
    known = {p["name"]: p["memory_mib"] for p in _families()[family]["profiles"]}
    return [
        {
            "name": p.name,
            "profile_id": p.profile_id,
            "compute_slices": p.slices,
            "memory_slices": p.memory_slices,
            "memory_mib": p.memory_mib if known.get(p.name) is not None else None,
            "max_count": p.max_count,
            "placements": [(q.start, q.size) for q in p.placements],
            "ci_profiles": [
                (c.profile_id, c.slices, c.max_count, c.name) for c in p.compute_profiles
            ],
        }
        for p in profiles
    ]


def reference(family: str) -> list[dict[str, Any]]:
    """The GPU-instance profiles of ``family`` with their compute-instance profiles, in the
    reference's order. A CI spanning its GI is named as the GI, any other ``<c>c.<gi>``
    (mig-profiles.md §1.1)."""
    fam = _families()[family]
    cis = {g["gi_compute_slices"]: g["ci_profiles"] for g in fam["compute_instance_profiles"]}
    return [
        {
            "name": p["name"],
            "profile_id": p["profile_id"],
            "compute_slices": p["compute_slices"],
            "memory_slices": p["memory_slices"],
            "memory_mib": p["memory_mib"],
            "max_count": p["max_count"],
            "placements": [(q["start"], q["size"]) for q in p["placements"]],
            "ci_profiles": [
                (
                    c["value"],
                    c["compute_slices"],
                    c["max_count"],
                    p["name"]
                    if c["compute_slices"] == p["compute_slices"]
                    else f"{c['compute_slices']}c.{p['name']}",
                )
                for c in cis[p["compute_slices"]]
            ],
        }
        for p in fam["profiles"]
    ]
