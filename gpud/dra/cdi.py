"""One transient CDI spec per prepared claim, named as NVIDIA's DRA driver names them.

kubelet passes the IDs Prepare answered (``k8s.gpu.nvidia.com/claim=<claimUID>-<device>``) to
the runtime, which resolves them from the spec files in ``/etc/cdi`` and ``/var/run/cdi``. The
claim UID in every name means a runtime's CDI cache never serves a stale entry, and the file
name follows from the UID alone, so Unprepare can remove it without anything else remembered.
``/var/run/cdi`` is a tmpfs: after a reboot the spec is gone while kubelet re-prepares the claim,
which is why Prepare writes the file every time, prepared before or not.

The container edits are what gpud knows of each device: its device nodes (``/dev/nvidiaN``; for a
MIG device its parent's plus the MIG capability nodes) and the control nodes. The spec's common
edits set ``NVIDIA_VISIBLE_DEVICES=void`` so that an NVIDIA runtime hook in legacy mode adds no
GPUs of its own to a container that got its GPUs through DRA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from gpud.atomic import fsync_dir, write_atomic

VENDOR = "k8s.gpu.nvidia.com"
CLASS = "claim"
KIND = f"{VENDOR}/{CLASS}"
# The oldest CDI version with every field used here; containerd 1.7+ and CRI-O 1.27+ read it.
CDI_VERSION = "0.5.0"


@dataclass(frozen=True, slots=True)
class DeviceEdits:
    """One allocated device as the container receives it."""

    name: str  # the ResourceSlice device name, e.g. gpu-3
    device_nodes: tuple[str, ...]


def spec_path(cdi_dir: Path, claim_uid: str) -> Path:
    """``<dir>/k8s.gpu.nvidia.com-claim_<uid>.yaml``: CDI's transient spec name."""
    return cdi_dir / f"{VENDOR}-{CLASS}_{claim_uid}.yaml"


def device_id(claim_uid: str, device: str) -> str:
    """The fully qualified CDI name kubelet hands the runtime."""
    return f"{KIND}={claim_uid}-{device}"


def claim_spec(
    claim_uid: str, devices: Sequence[DeviceEdits], control_nodes: Sequence[str]
) -> dict[str, object]:
    """The spec of one claim: each device with its own nodes, the control nodes common."""

    def nodes(paths: Sequence[str]) -> list[dict[str, str]]:
        return [{"path": p} for p in paths]

    common: dict[str, object] = {"env": ["NVIDIA_VISIBLE_DEVICES=void"]}
    if control_nodes:
        common["deviceNodes"] = nodes(control_nodes)
    return {
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": [
            {
                "name": f"{claim_uid}-{d.name}",
                "containerEdits": {"deviceNodes": nodes(d.device_nodes)},
            }
            for d in devices
        ],
        "containerEdits": common,
    }


def write_spec(cdi_dir: Path, claim_uid: str, spec: dict[str, object]) -> Path:
    """Write (or rewrite) the claim's spec atomically: a runtime never reads half a file."""
    path = spec_path(cdi_dir, claim_uid)
    text = yaml.safe_dump(spec, sort_keys=False)
    cdi_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomic(path, text.encode(), mode=0o644)
    return path


def remove_spec(cdi_dir: Path, claim_uid: str) -> bool:
    """Remove the claim's spec; False when there was none (an Unprepare repeated)."""
    path = spec_path(cdi_dir, claim_uid)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    with contextlib.suppress(OSError):
        fsync_dir(cdi_dir)
    return True
