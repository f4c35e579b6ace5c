"""Driver status over fake trees and fake dpkg-query/mokutil/systemctl on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.host.driver import (
    DPKG_FORMAT,
    DPKG_PATTERNS,
    DriverStatus,
    driver_status,
    parse_dpkg,
    parse_loaded_version,
    parse_secure_boot,
    upstream_version,
)
from tests.support.fakehost import FakeTools, golden, mkdir, write

KERNEL_NOBLE = "6.8.0-45-generic"
KERNEL_JAMMY = "5.15.0-119-generic"


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTools:
    """Fake tools as the only thing on PATH; defaults: Secure Boot off, persistenced active."""
    t = FakeTools(tmp_path / "tools")
    t.add_golden("mokutil", "mokutil-disabled")
    t.add("systemctl", "active\n")
    monkeypatch.setenv("PATH", t.path)
    return t


def node(root: Path, kernel: str, os_release: str = "os-release-ubuntu-24.04") -> Path:
    write(root, "/etc/os-release", golden(os_release))
    write(root, "/proc/sys/kernel/osrelease", kernel + "\n")
    mkdir(root, "/etc/modprobe.d")
    return root


def loaded(root: Path, golden_name: str) -> None:
    write(root, "/proc/driver/nvidia/version", golden(golden_name))
    mkdir(root, "/sys/module/nvidia")


def whats(st: DriverStatus) -> list[str]:
    return [p.what for p in st.problems]


def test_fresh_node_has_no_driver(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-none", rc=1)
    st = driver_status(node(tmp_path / "r", KERNEL_NOBLE))
    d = st.as_dict()
    assert d["module_loaded"] is False and d["loaded_version"] is None
    assert d["packages"] == [] and d["branch"] is None
    assert whats(st) == ["no NVIDIA driver package is installed"]
    assert st.problems[0].fix == "sudo gpudctl driver install"
    assert d["reboot_required"] is False
    dpkg = [c for c in tools.calls() if c[0] == "dpkg-query"]
    assert dpkg == [["dpkg-query", "-W", "-f", DPKG_FORMAT, *DPKG_PATTERNS]]
    assert ["mokutil", "--sb-state"] in tools.calls()
    assert ["systemctl", "is-active", "nvidia-persistenced"] in tools.calls()


def test_installed_with_reboot_pending(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-550-server-signed", rc=1)
    root = node(tmp_path / "r", KERNEL_NOBLE)
    write(root, "/var/run/reboot-required", "*** System restart required ***\n")
    write(root, "/var/run/reboot-required.pkgs", golden("reboot-required-nvidia.pkgs"))
    st = driver_status(root)
    d = st.as_dict()
    assert (d["branch"], d["server"], d["open"]) == ("550", True, False)
    assert d["installed_version"] == "550.127.05"
    assert d["signed_prebuilt"] is True and d["dkms"] is False
    assert d["reboot_required"] is True
    assert d["reboot_reasons"] == ["/var/run/reboot-required lists nvidia-dkms-550-server"]
    assert whats(st) == ["driver 550 is installed but its module is not loaded"]
    assert st.problems[0].fix.startswith("reboot (/var/run/reboot-required lists")
    names = [p["name"] for p in d["packages"]]
    assert "nvidia-driver-535-server" not in names  # 'un': known to dpkg, not installed
    assert "linux-modules-nvidia-550-server-6.8.0-45-generic" in names


def test_running_driver_matches(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-550-server-signed", rc=1)
    root = node(tmp_path / "r", KERNEL_NOBLE)
    loaded(root, "proc-driver-nvidia-version-550-open")
    write(root, "/lib/modprobe.d/blacklist-nouveau.conf", "# x\nblacklist nouveau\n")
    st = driver_status(root, nvml_version="550.127.05")
    d = st.as_dict()
    assert d["module_loaded"] is True and d["loaded_version"] == "550.127.05"
    assert d["nvml_version"] == "550.127.05"
    assert d["nouveau_blacklisted"] is True and d["nouveau_loaded"] is False
    assert d["secure_boot"] == "disabled" and d["persistenced"] == "active"
    assert d["problems"] == [] and d["reboot_required"] is False
    assert d["kernel"] == KERNEL_NOBLE


def test_secure_boot_with_dkms_modules(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-535-dkms", rc=1)
    tools.add_golden("mokutil", "mokutil-enabled")
    st = driver_status(node(tmp_path / "r", KERNEL_JAMMY, "os-release-ubuntu-22.04"))
    d = st.as_dict()
    assert (d["branch"], d["server"], d["dkms"], d["signed_prebuilt"]) == (
        "535",
        False,
        True,
        False,
    )
    assert d["secure_boot"] == "enabled"
    assert len(st.problems) == 1
    assert "Secure Boot is on" in st.problems[0].what
    fix = st.problems[0].fix
    assert f"linux-modules-nvidia-535-{KERNEL_JAMMY}" in fix and "mokutil --import" in fix


def test_dkms_loaded_under_secure_boot_is_fine(tmp_path: Path, tools: FakeTools) -> None:
    """A loaded DKMS module under Secure Boot means its key is enrolled already."""
    tools.add_golden("dpkg-query", "dpkg-535-dkms", rc=1)
    tools.add_golden("mokutil", "mokutil-enabled")
    root = node(tmp_path / "r", KERNEL_JAMMY)
    loaded(root, "proc-driver-nvidia-version-535")
    assert driver_status(root).problems == ()


def test_nouveau_loaded(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-535-dkms", rc=1)
    root = node(tmp_path / "r", KERNEL_JAMMY)
    mkdir(root, "/sys/module/nouveau")
    st = driver_status(root)
    assert st.facts.nouveau_loaded and not st.facts.nouveau_blacklisted
    nouveau = next(p for p in st.problems if "nouveau" in p.what)
    assert "blacklist nouveau" in nouveau.fix and "update-initramfs" in nouveau.fix
    assert "driver 535 is installed but its module is not loaded" in whats(st)
    # blacklisted (here on the kernel command line) but still loaded: only a reboot is missing
    write(root, "/proc/cmdline", "BOOT_IMAGE=/vmlinuz ro modprobe.blacklist=nouveau quiet\n")
    again = driver_status(root)
    assert again.facts.nouveau_blacklisted
    assert "still loaded" in next(p for p in again.problems if "nouveau" in p.what).fix


def test_installed_550_but_535_still_loaded(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-550-server-signed", rc=1)
    root = node(tmp_path / "r", KERNEL_NOBLE)
    loaded(root, "proc-driver-nvidia-version-535")
    st = driver_status(root)
    d = st.as_dict()
    assert d["reboot_required"] is True
    assert d["reboot_reasons"] == [
        "installed driver 550.127.05 but the loaded module is 535.183.01"
    ]
    assert whats(st) == [
        "installed 550.127.05 but the running module is 535.183.01 "
        "(NVML fails: driver/library version mismatch)"
    ]
    assert "reboot" in st.problems[0].fix


def test_mokutil_missing_means_unknown(tmp_path: Path, tools: FakeTools) -> None:
    (tools.bin / "mokutil").unlink()
    tools.add_golden("dpkg-query", "dpkg-535-dkms", rc=1)
    root = node(tmp_path / "r", KERNEL_JAMMY)
    loaded(root, "proc-driver-nvidia-version-535")
    st = driver_status(root)
    assert st.facts.secure_boot == "unknown"
    assert "Secure Boot state unknown: mokutil is not installed" in st.facts.notes
    assert st.problems == ()
    # and without EFI, mokutil's own answer means no Secure Boot
    tools.add_golden("mokutil", "mokutil-no-efi", rc=1)
    assert driver_status(root).facts.secure_boot == "disabled"


def test_dpkg_query_failing_is_a_clear_problem(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-broken", rc=2)
    st = driver_status(node(tmp_path / "r", KERNEL_NOBLE))
    assert len(st.problems) == 1
    assert st.problems[0].what.startswith("cannot list the installed packages: dpkg-query failed:")
    assert "parsing file '/var/lib/dpkg/status'" in st.problems[0].what
    (tools.bin / "dpkg-query").unlink()
    gone = driver_status(node(tmp_path / "r", KERNEL_NOBLE))
    assert "dpkg-query not found" in gone.problems[0].what


def test_persistenced_inactive_and_no_modules_for_this_kernel(
    tmp_path: Path, tools: FakeTools
) -> None:
    tools.add("systemctl", "inactive\n", rc=3)
    tools.add_golden("dpkg-query", "dpkg-550-server-signed", rc=1)
    root = node(tmp_path / "r", "6.8.0-48-generic")  # kernel upgraded, modules not
    st = driver_status(root)
    assert st.branch.signed_prebuilt is False
    assert whats(st) == [
        "no NVIDIA kernel modules are installed for the running kernel 6.8.0-48-generic"
    ]
    assert (
        st.problems[0].fix
        == "sudo apt-get install linux-modules-nvidia-550-server-6.8.0-48-generic"
    )
    loaded(root, "proc-driver-nvidia-version-550-open")
    running = driver_status(root)
    assert [p.fix for p in running.problems] == ["sudo systemctl enable --now nvidia-persistenced"]


def test_parsers() -> None:
    assert parse_loaded_version(golden("proc-driver-nvidia-version-550-open")) == "550.127.05"
    assert parse_loaded_version(golden("proc-driver-nvidia-version-535")) == "535.183.01"
    assert parse_loaded_version("garbage") is None
    pkgs = parse_dpkg("nvidia-dkms-550 550.1-1 iU \nnvidia-driver-550  un \nshort\n")
    assert [(p.name, p.status, p.broken, p.installed) for p in pkgs] == [
        ("nvidia-dkms-550", "iU", True, False)
    ]
    assert upstream_version("1:550.120-0ubuntu0.24.04.1") == "550.120"
    assert parse_secure_boot("SecureBoot enabled\n", "", 0) == "enabled"
    assert (
        parse_secure_boot("SecureBoot enabled\nSecureBoot validation is disabled in shim\n", "", 0)
        == "disabled"
    )
    assert parse_secure_boot("", "mokutil: command not found", 127) == "unknown"
    assert parse_secure_boot("", "Failed to read SecureBoot", 255) == "unknown"


def test_half_installed_and_several_branches(tmp_path: Path, tools: FakeTools) -> None:
    tools.add(
        "dpkg-query",
        "nvidia-driver-535 535.183.01-0ubuntu0.22.04.1 ii \n"
        "nvidia-dkms-535 535.183.01-0ubuntu0.22.04.1 ii \n"
        "nvidia-driver-550-open 550.127.05-0ubuntu0.22.04.1 iF \n"
        "nvidia-driver-550 550.127.05-0ubuntu0.22.04.1 ii \n",
        rc=1,
    )
    root = node(tmp_path / "r", KERNEL_JAMMY)
    loaded(root, "proc-driver-nvidia-version-535")
    st = driver_status(root)
    assert st.branch.branch == "550" and st.branch.branches == ("535", "550")
    assert any("half-installed: nvidia-driver-550-open" in w for w in whats(st))
    assert any("several driver branches are installed: 535, 550" in w for w in whats(st))


def _gpudctl(root: Path, tools: FakeTools, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": tools.path, "GPUD_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "driver", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gpudctl_driver_status_json_keys_and_exit_codes(tmp_path: Path, tools: FakeTools) -> None:
    tools.add_golden("dpkg-query", "dpkg-550-server-signed", rc=1)
    root = node(tmp_path / "r", KERNEL_NOBLE)
    loaded(root, "proc-driver-nvidia-version-550-open")
    ok = _gpudctl(root, tools, "-o", "json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert set(data) >= {
        "module_loaded",
        "loaded_version",
        "packages",
        "branch",
        "server",
        "open",
        "signed_prebuilt",
        "dkms",
        "nouveau_loaded",
        "nouveau_blacklisted",
        "secure_boot",
        "persistenced",
        "reboot_required",
        "reboot_reasons",
        "problems",
    }
    assert data["packages"][0] == {
        "name": "nvidia-headless-no-dkms-550-server",
        "version": "550.127.05-0ubuntu0.24.04.1",
        "status": "ii",
    }
    table = _gpudctl(root, tools)
    assert table.returncode == 0 and "no problems" in table.stdout
    assert "550 (server), 550.127.05" in table.stdout

    tools.add_golden("dpkg-query", "dpkg-none", rc=1)
    fresh = node(tmp_path / "fresh", KERNEL_NOBLE)
    bad = _gpudctl(fresh, tools, "-o", "yaml")
    assert bad.returncode == 1
    assert (
        "gpudctl: driver: no NVIDIA driver package is installed; "
        "fix: sudo gpudctl driver install" in bad.stderr
    )
    assert "fix: sudo gpudctl driver install" in _gpudctl(fresh, tools).stdout
