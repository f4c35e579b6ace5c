"""DRA devices as ``resource.k8s.io/v1`` ResourceSlices, and what to send so that the API server
holds exactly those.

One pool per node, named after the node (as NVIDIA's driver and the Go helper do), split into
slices of at most 128 devices, 64 when one of them has taints (the limits a v1.36 API server
enforces, shared/reference/dra.md §3.3). Consumers use only a pool's highest generation, so every
change to any slice is written with a new generation in every slice of the pool.

Each slice carries a digest of its content (less the generation) in an annotation: comparing
digests says whether the API server already holds what gpud computes without second-guessing
how the server normalises quantities or stamps taints, so an unchanged node (a restart of gpud
included) sends nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpud.dra.devices import DraDevice

API_VERSION = "resource.k8s.io/v1"
MAX_DEVICES = 128
MAX_DEVICES_TAINTED = 64
DIGEST_ANNOTATION = "gpud.dev/content-digest"


@dataclass(frozen=True, slots=True)
class Held:
    """A slice of this node's pool as the API server holds it."""

    name: str
    generation: int
    digest: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The writes that make the API server hold the wanted slices at ``generation``: held slices
    to delete, held slices to overwrite (name, body) and new ones to create (body)."""

    generation: int
    deletes: tuple[str, ...]
    updates: tuple[tuple[str, dict[str, Any]], ...]
    creates: tuple[dict[str, Any], ...]

    @property
    def writes(self) -> int:
        return len(self.deletes) + len(self.updates) + len(self.creates)


def chunks(devices: Sequence[DraDevice]) -> list[list[DraDevice]]:
    """The devices in slices, in order; a pool with a tainted device uses the smaller limit
    throughout, so a taint coming or going moves devices between slices at most once."""
    size = MAX_DEVICES_TAINTED if any(d.taints for d in devices) else MAX_DEVICES
    return [list(devices[i : i + size]) for i in range(0, len(devices), size)]


def slice_specs(devices: Sequence[DraDevice], driver: str, node: str) -> list[dict[str, Any]]:
    """The ``spec`` of every slice of the node's pool, generation 0 (set when written); no
    slice at all for a node without devices."""
    parts = chunks(devices)
    return [
        {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": 0, "resourceSliceCount": len(parts)},
            "devices": [d.to_api() for d in part],
        }
        for part in parts
    ]


def digest(spec: dict[str, Any]) -> str:
    """A slice's content less its generation, as a short stable hash."""
    content = dict(spec, pool={k: v for k, v in spec["pool"].items() if k != "generation"})
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def body(spec: dict[str, Any], generation: int, driver: str, node: str) -> dict[str, Any]:
    """A whole ResourceSlice object for ``spec`` at ``generation``; created with a generated
    name (``<node>-<driver>-xxxxx``), as the API server makes a unique one."""
    pool = dict(spec["pool"], generation=generation)
    return {
        "apiVersion": API_VERSION,
        "kind": "ResourceSlice",
        "metadata": {
            "generateName": f"{node}-{driver}-"[:58],
            "annotations": {DIGEST_ANNOTATION: digest(spec)},
        },
        "spec": dict(spec, pool=pool),
    }


def plan(
    specs: Sequence[dict[str, Any]],
    held: Sequence[Held],
    driver: str,
    node: str,
    floor: int = 0,
) -> Plan:
    """What to send so that the pool is ``specs``; a plan with no writes when it already is.

    Held slices are reused in name order (overwritten in place, so the pool never goes empty
    while it changes), the extra ones deleted first (the Go helper's order), missing ones
    created. The new generation is one above the highest held or ``floor`` (the last one gpud
    wrote, for a pool that was emptied meanwhile), so it only ever grows, across restarts of
    gpud too.
    """
    wanted = sorted(digest(s) for s in specs)
    top = max((h.generation for h in held), default=0)
    if wanted == sorted(h.digest for h in held) and all(h.generation == top for h in held):
        return Plan(top, (), (), ())
    generation = max(top, floor) + 1
    reuse = sorted(held, key=lambda h: h.name)
    bodies = [body(s, generation, driver, node) for s in specs]
    updates = tuple((h.name, b) for h, b in zip(reuse, bodies, strict=False))
    return Plan(
        generation,
        deletes=tuple(h.name for h in reuse[len(bodies) :]),
        updates=updates,
        creates=tuple(bodies[len(updates) :]),
    )
