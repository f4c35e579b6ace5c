"""What kind of node this is: the OS release and who runs containerd and the kubelet.

Host setup edits a containerd config, restarts a service and talks to a socket, and each of
those lives somewhere else on MicroK8s, k3s, kubeadm and a plain containerd host. Getting the
file wrong is worse than failing: MicroK8s regenerates ``containerd.toml`` from
``containerd-template.toml`` on every start and k3s renders ``config.toml`` from
``config.toml.tmpl``, so an edit to the rendered file silently disappears. Discovery reads only
files under a root prefix (plus one ``systemctl is-active``), so tests use fake trees and the
same code works on a chroot. Paths in :class:`Platform` are the real system's absolute paths;
:meth:`Platform.resolve` maps one under the root to open it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gpud.config import kubelet
from gpud.host.commands import CommandRunner, run_command

MICROK8S, K3S, KUBEADM, CONTAINERD, NONE = "microk8s", "k3s", "kubeadm", "containerd", "none"

MICROK8S_TEMPLATE = "/var/snap/microk8s/current/args/containerd-template.toml"
K3S_TEMPLATE = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"

_CONTAINERD_BINARIES = ("/usr/bin/containerd", "/usr/local/bin/containerd", "/usr/sbin/containerd")


def under(root: Path, path: str | PurePosixPath) -> Path:
    """``path`` (absolute, on the real system) as seen under ``root``."""
    return root / PurePosixPath(path).relative_to("/")


def _strip(root: Path, path: Path) -> Path:
    """The inverse of :func:`under`: a path found under ``root`` as the real system names it."""
    try:
        return Path("/") / path.relative_to(root)
    except ValueError:
        return path


@dataclass(frozen=True)
class Platform:
    """The node as discovered. Paths are absolute on the real system (``root`` stripped)."""

    root: Path
    os_id: str
    os_version: str
    os_codename: str
    flavour: str
    """``microk8s``, ``k3s``, ``kubeadm``, ``containerd`` (no Kubernetes found) or ``none``."""
    containerd_config: Path
    """The file to edit for the NVIDIA runtime (a template on MicroK8s and k3s)."""
    containerd_config_note: str
    containerd_socket: Path
    containerd_service: str
    """The systemd unit that runs containerd (``k3s``'s own unit on k3s)."""
    containerd_active: bool | None
    """``systemctl is-active`` of that unit; None when systemd could not say."""
    restart_command: tuple[str, ...]
    kubelet_flavour: str
    kubelet_device_plugin_dir: Path
    kubelet_pod_resources_socket: Path
    reasons: tuple[str, ...]
    """What was found where, in the order it was looked at (for ``gpudctl doctor``)."""

    def resolve(self, path: Path | str) -> Path:
        """Where one of this platform's paths lies under ``root`` (itself when root is ``/``)."""
        return under(self.root, str(path))

    def as_dict(self) -> dict[str, Any]:
        """The stable data form (``gpudctl platform -o json``); root is not part of it."""
        return {
            "os": {"id": self.os_id, "version": self.os_version, "codename": self.os_codename},
            "flavour": self.flavour,
            "containerd": {
                "config": str(self.containerd_config),
                "config_note": self.containerd_config_note,
                "socket": str(self.containerd_socket),
                "service": self.containerd_service,
                "active": self.containerd_active,
                "restart": list(self.restart_command),
            },
            "kubelet": {
                "flavour": self.kubelet_flavour,
                "device_plugin_dir": str(self.kubelet_device_plugin_dir),
                "pod_resources_socket": str(self.kubelet_pod_resources_socket),
            },
            "reasons": list(self.reasons),
        }


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): ``KEY=value`` lines, values optionally shell-quoted; comments ignored."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value.strip("\"'")]
        fields[key.strip()] = " ".join(words)
    return fields


def _os_release(root: Path, reasons: list[str]) -> dict[str, str]:
    # os-release(5): /etc/os-release wins, /usr/lib/os-release is the fallback.
    for name in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            fields = parse_os_release(under(root, name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        reasons.append(
            f"{name}: {fields.get('ID', '?')} {fields.get('VERSION_ID', '?')}"
            f" ({fields.get('VERSION_CODENAME', '?')})"
        )
        return fields
    reasons.append("no /etc/os-release or /usr/lib/os-release: OS unknown")
    return {}


def _first(root: Path, candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if under(root, c).exists()), None)


def _flavours(root: Path) -> list[tuple[str, str]]:
    """Every flavour with evidence on disk, in the order they win: (flavour, evidence path)."""
    found: list[tuple[str, str]] = []
    checks = (
        (MICROK8S, ("/snap/microk8s", "/var/snap/microk8s")),
        (K3S, ("/var/lib/rancher/k3s", "/etc/rancher/k3s")),
        (KUBEADM, ("/etc/kubernetes/kubelet.conf", "/var/lib/kubelet/config.yaml")),
        (CONTAINERD, ("/etc/containerd", *_CONTAINERD_BINARIES)),
    )
    for flavour, candidates in checks:
        hit = _first(root, candidates)
        if hit is not None:
            found.append((flavour, hit))
    return found


def _k3s_unit(root: Path) -> str:
    """k3s servers run ``k3s.service``, agents ``k3s-agent.service`` (install script names)."""
    for unit in ("k3s", "k3s-agent"):
        for d in ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"):
            if under(root, f"{d}/{unit}.service").exists():
                return unit
    return "k3s"


def _is_active(run: CommandRunner, unit: str) -> bool | None:
    result = run(["systemctl", "is-active", unit], 10.0)
    state = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    if state == "active":
        return True
    if state in ("inactive", "failed", "activating", "deactivating", "reloading"):
        return False
    return None  # no systemctl, no systemd (a container, a chroot), or no bus


def discover(root: Path = Path("/"), run: CommandRunner = run_command) -> Platform:
    """Find out what this node is from what lies under ``root``.

    MicroK8s wins over k3s, which wins over kubeadm, which wins over a bare containerd: each
    later one's files can exist beside an earlier one (MicroK8s links ``/var/lib/kubelet``), and
    the one that owns containerd is the one whose config must be edited. Every other flavour
    found is named in ``reasons`` so a doubled-up node is visible.
    """
    reasons: list[str] = []
    os_fields = _os_release(root, reasons)
    found = _flavours(root)
    flavour = found[0][0] if found else NONE
    for name, evidence in found:
        reasons.append(f"found {evidence}: {name}")
    if len(found) > 1 and found[1][0] != CONTAINERD:
        reasons.append(f"several Kubernetes flavours found; using {flavour}")
    if not found:
        reasons.append("no MicroK8s, k3s, kubeadm or containerd found")

    if flavour == MICROK8S:
        config, socket = MICROK8S_TEMPLATE, "/var/snap/microk8s/common/run/containerd.sock"
        note = (
            "MicroK8s regenerates args/containerd.toml from this template on every containerd"
            " start: edit the template, never containerd.toml"
        )
        service = "snap.microk8s.daemon-containerd"
        restart: tuple[str, ...] = ("snap", "restart", "microk8s.daemon-containerd")
    elif flavour == K3S:
        config, socket = K3S_TEMPLATE, "/run/k3s/containerd/containerd.sock"
        note = (
            "k3s renders config.toml from config.toml.tmpl when it starts and overwrites any edit"
            " to config.toml: edit the template (create it from config.toml if missing)"
        )
        service = _k3s_unit(root)
        restart = ("systemctl", "restart", service)
    else:
        config, socket = CONTAINERD_CONFIG, "/run/containerd/containerd.sock"
        note = "containerd's own config file"
        service = "containerd"
        restart = ("systemctl", "restart", "containerd")
    if not under(root, config).exists():
        reasons.append(f"{config} does not exist yet")

    active = _is_active(run, service) if flavour != NONE else None
    paths = kubelet.detect(root)
    reasons.append(f"kubelet: {paths.flavour} ({paths.reason})")
    return Platform(
        root=root,
        os_id=os_fields.get("ID", "unknown"),
        os_version=os_fields.get("VERSION_ID", ""),
        os_codename=os_fields.get("VERSION_CODENAME", ""),
        flavour=flavour,
        containerd_config=Path(config),
        containerd_config_note=note,
        containerd_socket=Path(socket),
        containerd_service=service,
        containerd_active=active,
        restart_command=restart,
        kubelet_flavour=paths.flavour,
        kubelet_device_plugin_dir=_strip(root, paths.device_plugin_dir),
        kubelet_pod_resources_socket=_strip(root, paths.pod_resources_socket),
        reasons=tuple(reasons),
    )
