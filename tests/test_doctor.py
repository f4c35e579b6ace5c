"""``gpudctl doctor``: the pure judgement over hand-built facts, and the command end to end.

The pure half is tested line by line (each kind of failure gives its line and its fix); the CLI
runs as a subprocess on a fake fresh node (no daemon) and beside a real simulated gpud with a
fake kubelet, where an injected XID must turn into a failing GPU line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gpud.cli.doctor import report_table
from gpud.host.doctor import (
    AREAS,
    BootstrapView,
    DaemonView,
    GpuView,
    PluginView,
    Report,
    diagnose,
)
from gpud.host.driver import DriverFacts, DriverStatus, judge, parse_dpkg
from gpud.host.platform import MICROK8S, Platform
from gpud.host.toolkit_install import ToolkitStatus, judge_status
from tests.support.fakehost import FakeTools, golden, mkdir, write
from tests.support.kubelet import FakeKubelet
from tests.support.process import GpudProcess

KERNEL = "6.8.0-45-generic"
UUID0, UUID1 = (
    "GPU-11111111-2222-3333-4444-555555555555",
    "GPU-66666666-7777-8888-9999-000000000000",
)
CONFIG = "/var/snap/microk8s/current/args/containerd-template.toml"
SPEC = "/var/run/cdi/nvidia.yaml"
DP_DIR = "/var/lib/kubelet/device-plugins"


def platform(flavour: str = MICROK8S) -> Platform:
    return Platform(
        root=Path("/"),
        os_id="ubuntu",
        os_version="24.04",
        os_codename="noble",
        flavour=flavour,
        containerd_config=Path(CONFIG),
        containerd_config_note="",
        containerd_socket=Path("/var/snap/microk8s/common/run/containerd.sock"),
        containerd_service="snap.microk8s.daemon-containerd",
        containerd_active=True,
        restart_command=("snap", "restart", "microk8s.daemon-containerd"),
        kubelet_flavour="microk8s",
        kubelet_device_plugin_dir=Path(DP_DIR),
        kubelet_pod_resources_socket=Path("/var/snap/microk8s/common/var/lib/kubelet/x.sock"),
        reasons=(),
    )


def driver(**changes: object) -> DriverStatus:
    facts = DriverFacts(
        module_loaded=True,
        loaded_version="550.127.05",
        nvml_version=None,
        kernel=KERNEL,
        packages=parse_dpkg(golden("dpkg-550-server-signed.out")),
        dpkg_error=None,
        nouveau_loaded=False,
        nouveau_blacklisted=False,
        secure_boot="disabled",
        persistenced="active",
        reboot_required_pkgs=None,
    )
    return judge(replace(facts, **changes))  # type: ignore[arg-type]


def spec(*names: str) -> dict[str, object]:
    return {"exists": True, "kind": "nvidia.com/gpu", "devices": list(names), "error": None}


def toolkit(**changes: object) -> ToolkitStatus:
    status = ToolkitStatus(
        version="1.17.8-1",
        package_error=None,
        binaries={"nvidia-ctk": "/usr/bin/nvidia-ctk"},
        config=CONFIG,
        config_exists=True,
        config_error=None,
        runtime_configured=True,
        default_runtime=False,
        cdi_enabled=True,
        cdi_specs={SPEC: spec("nvidia.com/gpu=all", "nvidia.com/gpu=0", f"nvidia.com/gpu={UUID0}")},
    )
    status = replace(status, **changes)  # type: ignore[arg-type]
    return replace(status, problems=judge_status(status))


LINK_OFF = {"name": "kubernetes", "state": "ok", "error": "", "detail": "off: no kubeconfig"}


def daemon(**changes: object) -> DaemonView:
    view = DaemonView(
        socket="/run/gpud/gpud.sock",
        version="0.1.0",
        backend="nvml",
        driver_version="550.127.05",
        kubelet_dir=DP_DIR,
        kubelet_connected=True,
        gpus=(GpuView(0, UUID0, "Healthy"),),
        plugins=(PluginView("nvidia.com/gpu", True, 1, 1),),
        publishers=(LINK_OFF,),
    )
    return replace(view, **changes)  # type: ignore[arg-type]


def fails(report: Report) -> dict[tuple[str, str], tuple[str, str]]:
    return {(c.area, c.name): (c.detail, c.fix) for c in report.failures}


def test_all_good_passes_with_no_fail_line() -> None:
    report = diagnose(platform(), driver(), toolkit(), daemon(), None)
    assert report.ok, report.failures
    assert {c.area for c in report.checks} == set(AREAS)
    table = report_table(report)
    assert "FAIL" not in table and "all checks passed" in table
    assert "driver 550.127.05 loaded" in table
    data = report.as_dict()
    assert data["ok"] is True
    assert set(data["checks"][0]) == {"area", "name", "ok", "detail", "fix"}


def test_unknown_is_not_a_failure() -> None:
    report = diagnose(platform(), driver(secure_boot="unknown"), toolkit(), daemon(), None)
    assert report.ok
    unknown = [c for c in report.checks if c.ok is None]
    assert [(c.area, c.name) for c in unknown] == [("driver", "secure boot")]
    line = next(t for t in report_table(report).splitlines() if "secure boot" in t)
    assert line.startswith("?   driver")


def test_the_api_link_line_says_off_or_why_it_fails() -> None:
    def line(**changes: object) -> tuple[bool | None, str, str]:
        report = diagnose(platform(), driver(), toolkit(), daemon(**changes), None)
        (found,) = [c for c in report.checks if c.area == "cluster"]
        return found.ok, found.detail, found.fix

    assert line() == (True, "off: no kubeconfig", "")
    mismatch = "system:node:other is not allowed to modify node gpu-node-1: ..."
    failing = dict(LINK_OFF, state="degraded", error=mismatch, detail="node gpu-node-1")
    ok, detail, fix = line(publishers=(failing,))
    assert (ok, detail) == (False, mismatch) and "docs/cluster.md" in fix
    assert line(publishers=())[0] is None


def bootstrap_line(view: BootstrapView | None) -> tuple[bool | None, str, str]:
    report = diagnose(platform(), driver(), toolkit(), daemon(), None, bootstrap=view)
    (line,) = [c for c in report.checks if c.area == "bootstrap"]
    return line.ok, line.detail, line.fix


def test_bootstrap_state_each_phase() -> None:
    at = "2025-06-01T10:00:00Z"
    assert bootstrap_line(None) == (True, "gpud bootstrap has not run on this node", "")
    assert bootstrap_line(BootstrapView("done", time=at))[:2] == (True, f"done (at {at})")
    ok, detail, _ = bootstrap_line(BootstrapView("running", "toolkit", at, 812, running=True))
    assert (ok, detail) == (None, f"running step toolkit, pid 812 (at {at})")
    ok, detail, fix = bootstrap_line(BootstrapView("running", "toolkit", at, 812, running=False))
    assert ok is False
    assert detail.startswith(f"stale: bootstrap.json says running step toolkit (at {at})")
    assert "(pid 812) is gone" in detail and fix.startswith("sudo gpud bootstrap")
    # a state file gpudctl could read but a lock it could not: unknown, not stale
    assert bootstrap_line(BootstrapView("running", "toolkit", at, 812, running=None))[0] is None
    failed = BootstrapView(
        "failed",
        "toolkit",
        at,
        812,
        running=False,
        failed_step="toolkit",
        detail="'apt-get update' did not run: ...\nmore",
        fix="wait for unattended-upgr (pid 9) to finish",
        armed=True,
    )
    ok, detail, fix = bootstrap_line(failed)
    assert (
        ok is False
        and detail == f"step toolkit failed (at {at}): 'apt-get update' did not run: ..."
    )
    assert fix == (
        "wait for unattended-upgr (pid 9) to finish; then sudo gpud bootstrap; "
        "gpud-bootstrap-resume.service tries again at the next boot"
    )
    mok = BootstrapView("awaiting-mok-enrollment", "reboot", at, fix="1. sudo mokutil --import x")
    ok, detail, fix = bootstrap_line(mok)
    assert ok is False and "DKMS's key is enrolled at the console" in detail
    assert fix == "1. sudo mokutil --import x"
    waiting = bootstrap_line(BootstrapView("awaiting-reboot", "reboot", at, rebooted=False))
    assert waiting[0] is False and waiting[2].startswith("sudo systemctl reboot")
    lost = bootstrap_line(BootstrapView("awaiting-reboot", "reboot", at, rebooted=True))
    assert lost[0] is False and "systemctl status gpud-bootstrap-resume.service" in lost[2]


def test_host_failures_each_give_their_line_and_fix() -> None:
    report = diagnose(
        platform("none"),
        driver(module_loaded=False, loaded_version=None, packages=()),
        toolkit(version=None, config_exists=False, runtime_configured=None, cdi_specs={}),
        daemon(),
        None,
    )
    got = fails(report)
    assert got[("platform", "flavour")][1].startswith("install Kubernetes")
    assert got[("platform", "containerd config")][0] == f"{CONFIG} does not exist"
    assert got[("driver", "packages")] == (
        "no NVIDIA driver package is installed",
        "sudo gpudctl driver install",
    )
    assert got[("toolkit", "package")] == (
        "nvidia-container-toolkit is not installed",
        "sudo gpudctl toolkit install",
    )
    # the missing config is said once, by the platform line
    assert sum("does not exist" in d for d, _ in got.values()) == 1
    assert not report.ok


def test_driver_problems_and_runtime_not_configured() -> None:
    report = diagnose(
        platform(),
        driver(nouveau_loaded=True, persistenced="failed"),
        toolkit(runtime_configured=False),
        daemon(),
        None,
    )
    got = fails(report)
    assert "nouveau" in got[("driver", "nouveau")][0]
    assert got[("driver", "persistenced")][1] == "sudo systemctl enable --now nvidia-persistenced"
    assert got[("toolkit", "runtime")][1] == "sudo gpudctl toolkit configure"
    assert not any(c.detail.startswith("driver ") for c in report.checks if c.ok)


def test_cdi_missing_spec_bad_spec_and_stale_spec() -> None:
    missing = fails(diagnose(platform(), driver(), toolkit(cdi_specs={}), daemon(), None))
    assert missing[("cdi", "spec")] == (
        "enable_cdi is on but there is no NVIDIA CDI spec",
        "sudo gpudctl toolkit cdi",
    )
    no_all = toolkit(cdi_specs={SPEC: spec("nvidia.com/gpu=0")})
    detail, fix = fails(diagnose(platform(), driver(), no_all, daemon(), None))[("cdi", "spec")]
    assert "no nvidia.com/gpu=all" in detail and fix == "sudo gpudctl toolkit cdi"
    two = daemon(gpus=(GpuView(0, UUID0, "Healthy"), GpuView(1, UUID1, "Healthy")))
    detail, _ = fails(diagnose(platform(), driver(), toolkit(), two, None))[("cdi", "spec")]
    assert UUID1 in detail and "stale" in detail
    off = diagnose(platform(), driver(), toolkit(cdi_enabled=False, cdi_specs={}), daemon(), None)
    assert off.ok


def test_daemon_not_running_and_permission_denied() -> None:
    report = diagnose(platform(), driver(), toolkit(), None, "no socket at /run/gpud/gpud.sock")
    detail, fix = fails(report)[("daemon", "reachable")]
    assert detail.startswith("gpud is not running")
    assert "sudo systemctl start gpud" in fix and "sudo gpud run" in fix
    assert {(c.area, c.ok) for c in report.checks if c.area in ("gpus", "plugins")} == {
        ("gpus", None),
        ("plugins", None),
    }
    # without the daemon, the kubelet line rests on what is on disk
    no_sock = diagnose(platform(), driver(), toolkit(), None, "x", kubelet_sock=False)
    assert DP_DIR in fails(no_sock)[("kubelet", "kubelet.sock")][1]
    denied = diagnose(platform(), driver(), toolkit(), None, "x.sock: Permission denied")
    assert "usermod -aG gpud" in fails(denied)[("daemon", "reachable")][1]


def test_backend_and_resource_errors() -> None:
    view = daemon(backend_error="no driver: libnvidia-ml.so.1 not found", gpus=(), plugins=())
    got = fails(diagnose(platform(), driver(), toolkit(), view, None))
    assert got[("daemon", "backend")][0] == "no driver: libnvidia-ml.so.1 not found"
    assert ("gpus", "health") not in got  # unknown, the backend line says why
    view = daemon(resource_error="migStrategy single needs one MIG profile")
    detail, fix = fails(diagnose(platform(), driver(), toolkit(), view, None))[
        ("daemon", "resources")
    ]
    assert "migStrategy single" in detail and "gpudctl config reload" in fix


def test_unhealthy_gpu_kubelet_and_plugin_failures() -> None:
    view = daemon(
        kubelet_dir="/elsewhere/device-plugins",
        kubelet_connected=False,
        gpus=(GpuView(0, UUID0, "Unhealthy", "critical XID 79"), GpuView(1, UUID1, "Healthy")),
        plugins=(PluginView("nvidia.com/gpu", False, error="kubelet.sock: connection refused"),),
    )
    got = fails(diagnose(platform(), driver(), toolkit(), view, None))
    detail, fix = got[("gpus", "GPU 0")]
    assert "critical XID 79" in detail and fix.endswith(f"sudo gpudctl device set-healthy {UUID0}")
    detail, fix = got[("kubelet", "kubelet.sock")]
    assert "/elsewhere/device-plugins" in detail and DP_DIR in fix
    assert "connection refused" in got[("plugins", "nvidia.com/gpu")][0]
    none = fails(diagnose(platform(), driver(), toolkit(), daemon(plugins=()), None))
    assert "no device plugin is running" in none[("plugins", "registered")][0]


# --- the command ------------------------------------------------------------------------------


def fresh_node(base: Path) -> tuple[Path, FakeTools]:
    """A fake Ubuntu 24.04 MicroK8s node with nothing NVIDIA on it."""
    root = base / "root"
    write(root, "/etc/os-release", golden("os-release-ubuntu-24.04"))
    write(root, "/proc/sys/kernel/osrelease", KERNEL + "\n")
    mkdir(root, "/etc/modprobe.d")
    mkdir(root, "/snap/microk8s")
    write(root, CONFIG, golden_containerd())
    tools = FakeTools(base / "tools")
    tools.add_golden("dpkg-query", "dpkg-none", rc=1)
    tools.add_golden("mokutil", "mokutil-disabled")
    tools.add("systemctl", "active\n")
    return root, tools


def golden_containerd() -> str:
    return 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'


def gpudctl(
    root: Path, tools: FakeTools, socket: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": tools.path, "GPUD_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(socket), "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_fresh_node_without_daemon(tmp_path: Path) -> None:
    root, tools = fresh_node(tmp_path)
    out = gpudctl(root, tools, tmp_path / "gpud.sock")
    assert out.returncode == 1, out.stderr
    text = out.stdout
    for line, fix in (
        ("no NVIDIA driver package", "sudo gpudctl driver install"),
        ("nvidia-container-toolkit is not installed", "sudo gpudctl toolkit install"),
        ("gpud is not running", "sudo systemctl start gpud"),
    ):
        lines = text.splitlines()
        at = next(i for i, t in enumerate(lines) if line in t)
        assert lines[at].startswith("FAIL"), lines[at]
        assert lines[at + 1].strip() == f"fix: {lines[at + 1].strip()[5:]}"
        assert fix in lines[at + 1]
    data = json.loads(gpudctl(root, tools, tmp_path / "gpud.sock", "-o", "json").stdout)
    assert data["ok"] is False
    assert any(
        c["area"] == "daemon" and c["ok"] is False and "sudo gpud run" in c["fix"]
        for c in data["checks"]
    )


@pytest.fixture
def live(short_tmp: Path) -> Iterator[tuple[Path, FakeTools, GpudProcess]]:
    root, tools = fresh_node(short_tmp / "host")
    kubelet = FakeKubelet(short_tmp / "kubelet")
    gpud = GpudProcess(
        "t4x1",
        short_tmp / "kubelet",
        short_tmp / "state",
        short_tmp / "gpud.sock",
        log_dir=short_tmp / "log",
    )
    kubelet.start()
    gpud.start()
    try:
        gpud.wait_ready()
        kubelet.wait_registered("nvidia.com/gpu")
        yield root, tools, gpud
    finally:
        if gpud.running():
            gpud.terminate()
        kubelet.stop()
        print(gpud.log())


@pytest.mark.integration
def test_cli_with_a_real_gpud_and_an_injected_xid(
    live: tuple[Path, FakeTools, GpudProcess],
) -> None:
    root, tools, gpud = live

    def checks() -> dict[tuple[str, str], dict[str, object]]:
        out = gpudctl(root, tools, gpud.socket, "-o", "json")
        assert out.returncode in (0, 1), out.stderr
        return {(c["area"], c["name"]): c for c in json.loads(out.stdout)["checks"]}

    before = checks()
    for key in (("daemon", "reachable"), ("kubelet", "kubelet.sock"), ("gpus", "health")):
        assert before[key]["ok"] is True, before[key]
    assert before[("plugins", "nvidia.com/gpu")]["ok"] is True
    live_areas = ("daemon", "gpus", "plugins", "kubelet")
    assert all(c["ok"] is True for k, c in before.items() if k[0] in live_areas), before

    ctl = [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(gpud.socket)]
    inject = ["debug", "inject-xid", "--gpu", "0", "--xid", "79"]
    xid = subprocess.run([*ctl, *inject], capture_output=True, text=True, timeout=60, check=False)
    assert xid.returncode == 0, xid.stderr
    uuid = gpud.status().gpus[0].uuid
    after = checks()
    gpu0 = after[("gpus", "GPU 0")]
    assert gpu0["ok"] is False and "XID 79" in str(gpu0["detail"])
    assert gpu0["fix"] and str(gpu0["fix"]).endswith(f"sudo gpudctl device set-healthy {uuid}")
    table = gpudctl(root, tools, gpud.socket)
    assert table.returncode == 1
    assert (
        f"fix: repair it (see dmesg, nvidia-smi -q), then sudo gpudctl device set-healthy {uuid}"
        in table.stdout
    )
