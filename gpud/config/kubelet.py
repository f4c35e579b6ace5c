"""Where kubelet looks for device plugins, and where its PodResources socket is.

kubelet hard-codes ``/var/lib/kubelet/device-plugins/`` whatever its ``--root-dir``; on MicroK8s
``/var/lib/kubelet`` is (or becomes) a symlink into the snap's data, which the hard-coded path then
follows. k3s runs its kubelet with a root under ``/var/lib/rancher`` and the device-plugin path
follows that root. Detection is a pure function over a root prefix so tests use fake trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

UPSTREAM_ROOT = Path("var/lib/kubelet")
MICROK8S_ROOT = Path("var/snap/microk8s/common/var/lib/kubelet")
K3S_ROOT = Path("var/lib/rancher/k3s/agent/kubelet")


@dataclass(frozen=True)
class KubeletPaths:
    flavour: str
    device_plugin_dir: Path
    pod_resources_socket: Path
    reason: str
    # kubelet's --root-dir: plugins_registry/ and plugins/<driver>/ (DRA) are below it.
    root: Path


def detect(root: Path = Path("/")) -> KubeletPaths:
    """Guess the kubelet flavour from what is on disk under ``root``."""
    if (root / "var/lib/rancher/k3s/agent").is_dir():
        return KubeletPaths(
            "k3s",
            root / K3S_ROOT / "device-plugins",
            root / K3S_ROOT / "pod-resources/kubelet.sock",
            "found /var/lib/rancher/k3s/agent",
            root / K3S_ROOT,
        )
    if (root / "snap/microk8s").exists() or (root / MICROK8S_ROOT).is_dir():
        # The device-plugin path stays the hard-coded one (through the symlink when it exists);
        # PodResources lives under kubelite's real --root-dir.
        return KubeletPaths(
            "microk8s",
            root / UPSTREAM_ROOT / "device-plugins",
            root / MICROK8S_ROOT / "pod-resources/kubelet.sock",
            "found MicroK8s",
            root / MICROK8S_ROOT,
        )
    return KubeletPaths(
        "kubelet",
        root / UPSTREAM_ROOT / "device-plugins",
        root / UPSTREAM_ROOT / "pod-resources/kubelet.sock",
        "kubelet's default",
        root / UPSTREAM_ROOT,
    )
