"""Platform discovery over fake root trees: which containerd file, socket and service to use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpud.host import commands
from gpud.host.platform import discover, parse_os_release, under
from tests.support.fakehost import FakeTools, golden, mkdir, write


def _no_systemd(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(list(argv), 127, "", "systemctl: command not found\n")


def microk8s_node(root: Path) -> Path:
    """Ubuntu 24.04 with the MicroK8s snap, /var/lib/kubelet linked into the snap's data."""
    write(root, "/etc/os-release", golden("os-release-ubuntu-24.04"))
    mkdir(root, "/snap/microk8s/current")
    write(root, "/var/snap/microk8s/current/args/containerd-template.toml", "version = 2\n")
    write(root, "/var/snap/microk8s/current/args/containerd.toml", "# regenerated\n")
    mkdir(root, "/var/snap/microk8s/common/var/lib/kubelet")
    return root


def kubeadm_node(root: Path) -> Path:
    write(root, "/etc/os-release", golden("os-release-ubuntu-22.04"))
    write(root, "/etc/kubernetes/kubelet.conf", "apiVersion: v1\n")
    write(root, "/var/lib/kubelet/config.yaml", "kind: KubeletConfiguration\n")
    write(root, "/etc/containerd/config.toml", "version = 2\n")
    return root


def test_microk8s_edits_the_template_never_containerd_toml(tmp_path: Path) -> None:
    p = discover(microk8s_node(tmp_path), _no_systemd)
    assert (p.os_id, p.os_version, p.os_codename) == ("ubuntu", "24.04", "noble")
    assert p.flavour == "microk8s"
    assert p.containerd_config == Path("/var/snap/microk8s/current/args/containerd-template.toml")
    assert "never containerd.toml" in p.containerd_config_note
    assert p.containerd_socket == Path("/var/snap/microk8s/common/run/containerd.sock")
    assert p.containerd_service == "snap.microk8s.daemon-containerd"
    assert p.restart_command == ("snap", "restart", "microk8s.daemon-containerd")
    assert p.kubelet_flavour == "microk8s"
    assert p.kubelet_device_plugin_dir == Path("/var/lib/kubelet/device-plugins")
    assert p.kubelet_pod_resources_socket == Path(
        "/var/snap/microk8s/common/var/lib/kubelet/pod-resources/kubelet.sock"
    )
    assert p.resolve(p.containerd_config).read_text() == "version = 2\n"
    assert any("/snap/microk8s" in r for r in p.reasons)
    assert p.containerd_active is None


def test_microk8s_found_from_var_snap_alone(tmp_path: Path) -> None:
    mkdir(tmp_path, "/var/snap/microk8s/current/args")
    assert discover(tmp_path, _no_systemd).flavour == "microk8s"


def test_kubeadm_on_jammy(tmp_path: Path) -> None:
    p = discover(kubeadm_node(tmp_path), _no_systemd)
    assert (p.os_id, p.os_version, p.os_codename) == ("ubuntu", "22.04", "jammy")
    assert p.flavour == "kubeadm"
    assert p.containerd_config == Path("/etc/containerd/config.toml")
    assert p.containerd_socket == Path("/run/containerd/containerd.sock")
    assert p.containerd_service == "containerd"
    assert p.restart_command == ("systemctl", "restart", "containerd")
    assert p.kubelet_device_plugin_dir == Path("/var/lib/kubelet/device-plugins")
    # kubeadm nodes also have /etc/containerd; that is not "several flavours"
    assert not any("several" in r for r in p.reasons)


@pytest.mark.parametrize(("unit", "expected"), [(None, "k3s"), ("k3s-agent", "k3s-agent")])
def test_k3s_edits_the_tmpl_and_restarts_its_own_unit(
    tmp_path: Path, unit: str | None, expected: str
) -> None:
    write(tmp_path, "/etc/os-release", golden("os-release-ubuntu-24.04"))
    mkdir(tmp_path, "/var/lib/rancher/k3s/agent/etc/containerd")
    if unit:
        write(tmp_path, f"/etc/systemd/system/{unit}.service", "[Service]\n")
    p = discover(tmp_path, _no_systemd)
    assert p.flavour == "k3s"
    assert p.containerd_config == Path("/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl")
    assert "renders config.toml" in p.containerd_config_note
    assert p.containerd_socket == Path("/run/k3s/containerd/containerd.sock")
    assert p.containerd_service == expected
    assert p.restart_command == ("systemctl", "restart", expected)
    assert p.kubelet_flavour == "k3s"
    assert p.kubelet_device_plugin_dir == Path("/var/lib/rancher/k3s/agent/kubelet/device-plugins")
    assert any("config.toml.tmpl does not exist yet" in r for r in p.reasons)


def test_plain_debian_containerd(tmp_path: Path) -> None:
    write(tmp_path, "/etc/os-release", golden("os-release-debian-12"))
    write(tmp_path, "/usr/bin/containerd", "")
    p = discover(tmp_path, _no_systemd)
    assert (p.os_id, p.os_version, p.os_codename) == ("debian", "12", "bookworm")
    assert p.flavour == "containerd"
    assert p.containerd_config == Path("/etc/containerd/config.toml")
    assert any("found /usr/bin/containerd" in r for r in p.reasons)


def test_nothing_installed(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return _no_systemd(argv, timeout)

    p = discover(tmp_path, run)
    assert p.flavour == "none" and p.os_id == "unknown"
    assert any("OS unknown" in r for r in p.reasons)
    assert calls == []  # no service to ask about
    assert p.containerd_active is None


def test_os_release_fallback_and_quoting(tmp_path: Path) -> None:
    write(tmp_path, "/usr/lib/os-release", "ID='ubuntu'\nVERSION_ID=\"24.04\"\n# c\nBAD\n")
    assert discover(tmp_path, _no_systemd).os_version == "24.04"
    assert parse_os_release('NAME="Debian GNU/Linux"\n')["NAME"] == "Debian GNU/Linux"


def test_several_flavours_are_named(tmp_path: Path) -> None:
    microk8s_node(tmp_path)
    mkdir(tmp_path, "/etc/rancher/k3s")
    p = discover(tmp_path, _no_systemd)
    assert p.flavour == "microk8s"
    assert any("several Kubernetes flavours found; using microk8s" in r for r in p.reasons)


def test_service_state_through_fake_systemctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = FakeTools(tmp_path / "t")
    tools.add("systemctl", "inactive\n", rc=3)
    monkeypatch.setenv("PATH", tools.path)
    p = discover(kubeadm_node(tmp_path / "root"))
    assert p.containerd_active is False
    assert tools.calls() == [["systemctl", "is-active", "containerd"]]
    tools.add("systemctl", "active\n")
    assert discover(microk8s_node(tmp_path / "root2")).containerd_active is True
    assert tools.calls()[-1] == ["systemctl", "is-active", "snap.microk8s.daemon-containerd"]


def test_under_and_as_dict(tmp_path: Path) -> None:
    assert under(tmp_path, "/etc/x") == tmp_path / "etc/x"
    assert under(Path("/"), "/etc/x") == Path("/etc/x")
    d = discover(microk8s_node(tmp_path), _no_systemd).as_dict()
    assert str(tmp_path) not in json.dumps(d)  # real-system paths only
    assert d["containerd"]["restart"] == ["snap", "restart", "microk8s.daemon-containerd"]
    assert set(d) == {"os", "flavour", "containerd", "kubelet", "reasons"}


def test_real_runner_never_raises(tmp_path: Path) -> None:
    gone = commands.run_command(["gpud-no-such-tool-xyz"], 5)
    assert gone.returncode == 127 and "not found" in gone.stderr
    assert commands.missing(gone)
    script = write(tmp_path, "/slow", "#!/bin/sh\nsleep 5\n")
    script.chmod(0o755)
    slow = commands.run_command([str(script)], 0.2)
    assert slow.returncode == 124 and "no answer" in slow.stderr
    notexec = write(tmp_path, "/plain", "")
    assert commands.run_command([str(notexec)], 5).returncode == 126
    ok = commands.run_command([sys.executable, "-c", "print('hi')"], 10)
    assert (ok.returncode, ok.stdout) == (0, "hi\n")


def test_gpudctl_platform_json(tmp_path: Path) -> None:
    tools = FakeTools(tmp_path / "t")
    tools.add("systemctl", "active\n")
    root = microk8s_node(tmp_path / "root")
    env = {**os.environ, "PATH": tools.path, "GPUD_ROOT": str(root)}
    out = subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "platform", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["flavour"] == "microk8s"
    assert data["containerd"]["active"] is True
    table = subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "platform"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert "containerd-template.toml" in table.stdout and "snap.microk8s" in table.stdout
