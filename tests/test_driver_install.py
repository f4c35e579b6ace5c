"""``gpudctl driver install`` against fake ubuntu-drivers/apt-get/dpkg-query whose answers change.

The fakes share a state directory: ``ubuntu-drivers install`` and ``apt-get install`` replace
what ``dpkg-query`` answers next, as the real tools change dpkg's database. Their exit codes are
0 unless a test says otherwise, as ubuntu-drivers' are whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.cli.gpudctl import main
from gpud.host.driver import driver_status
from gpud.host.driver_install import (
    WantedBranch,
    choose,
    parse_candidates,
    parse_wanted,
    plan_install,
)
from tests.support.fakehost import GOLDEN, FakeTools, golden, mkdir, write

KERNEL = "6.8.0-45-generic"
MUTATING = {"ubuntu-drivers install", "apt-get install"}

# dpkg-query lines end in a blank (Status-Abbrev is three characters wide)
TRANSITIONAL_565 = "".join(
    f"{line} ii \n"
    for line in (
        "nvidia-headless-no-dkms-565-server 565.57.01-0ubuntu0.24.04.1",
        "nvidia-headless-no-dkms-580-server 580.95.05-0ubuntu0.24.04.1",
        "nvidia-compute-utils-580-server 580.95.05-0ubuntu0.24.04.1",
        "linux-modules-nvidia-580-server-generic 6.8.0-45.45",
        "linux-modules-nvidia-580-server-6.8.0-45-generic 6.8.0-45.45+1",
    )
)


class Node:
    """A fake root plus fake tools with shared state (``self.state``)."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tmp / "root"
        write(self.root, "/etc/os-release", golden("os-release-ubuntu-24.04"))
        write(self.root, "/proc/sys/kernel/osrelease", KERNEL + "\n")
        mkdir(self.root, "/etc/modprobe.d")
        self.state = tmp / "state"
        self.state.mkdir()
        self.tools = FakeTools(tmp / "tools")
        s = str(self.state)
        self.tools.add_script(
            "dpkg-query", f'/bin/cat "{s}/dpkg.out"; /bin/cat "{s}/dpkg.err" >&2; exit 1'
        )
        self.tools.add_script(
            "ubuntu-drivers",
            f'case "$1" in\n'
            f'  list) /bin/cat "{s}/list.out" ;;\n'
            f'  install) /bin/cat "{s}/ud.out" 2>/dev/null; /bin/cat "{s}/ud.err" >&2 2>/dev/null\n'
            f'    if [ -f "{s}/after-ud.out" ]; then /bin/cp "{s}/after-ud.out" "{s}/dpkg.out"; '
            f'/bin/cp "{s}/after-ud.err" "{s}/dpkg.err"; fi ;;\n'
            "esac\nexit 0",
        )
        self.tools.add_script(
            "apt-get",
            f'if [ -f "{s}/apt-fail" ]; then /bin/cat "{s}/apt-fail" >&2; exit 100; fi\n'
            f'if [ -f "{s}/after-apt.out" ]; then /bin/cp "{s}/after-apt.out" "{s}/dpkg.out"; '
            f'/bin/cp "{s}/after-apt.err" "{s}/dpkg.err"; fi\nexit 0',
        )
        self.tools.add_golden("mokutil", "mokutil-disabled")
        self.tools.add("systemctl", "inactive\n", rc=3)
        self.dpkg("dpkg-none")
        self.listing("ubuntu-drivers-list-gpgpu-noble-h100.out")
        monkeypatch.setenv("PATH", self.tools.path)
        monkeypatch.setenv("GPUD_ROOT", str(self.root))
        monkeypatch.setattr(os, "geteuid", lambda: 0)

    def dpkg(self, stem: str, when: str = "dpkg") -> None:
        """What dpkg-query answers now (``dpkg``) or after ``after-ud``/``after-apt``."""
        for ext in ("out", "err"):
            src = GOLDEN / f"{stem}.{ext}"
            (self.state / f"{when}.{ext}").write_text(
                src.read_text(encoding="utf-8") if src.exists() else "", encoding="utf-8"
            )

    def dpkg_text(self, out: str, when: str) -> None:
        (self.state / f"{when}.out").write_text(out, encoding="utf-8")
        (self.state / f"{when}.err").write_text("", encoding="utf-8")

    def listing(self, name: str) -> None:
        shutil.copy(GOLDEN / name, self.state / "list.out")

    def load(self, golden_name: str) -> None:
        write(self.root, "/proc/driver/nvidia/version", golden(golden_name))
        mkdir(self.root, "/sys/module/nvidia")

    def mutating_calls(self) -> list[list[str]]:
        return [c for c in self.tools.calls() if " ".join(c[:2]) in MUTATING]

    def state_file(self) -> dict[str, object]:
        return json.loads((self.root / "var/lib/gpud/driver.json").read_text(encoding="utf-8"))


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    return Node(tmp_path, monkeypatch)


def install(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    rc = main(["driver", "install", "-o", "json", *args])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def fresh_install_fakes(node: Node) -> None:
    node.dpkg("dpkg-550-server-no-utils", "after-ud")
    node.dpkg("dpkg-550-server-signed", "after-apt")


def test_parse_candidates_and_choice() -> None:
    cands = parse_candidates(golden("ubuntu-drivers-list-gpgpu-noble-h100.out"))
    assert len(cands) == 8
    first = cands[0]
    assert (first.package, first.branch, first.server, first.open) == (
        "nvidia-driver-535-server",
        "535",
        True,
        False,
    )
    assert first.modules == "linux-modules-nvidia-535-server-generic"
    assert choose(cands, None).flavour == "550-server"  # type: ignore[union-attr]
    assert choose(cands, parse_wanted("535")).flavour == "535-server"  # type: ignore[union-attr]
    assert choose(cands, parse_wanted("550-server-open")).flavour == "550-server-open"  # type: ignore[union-attr]
    assert choose(cands, parse_wanted("470")) is None
    assert parse_candidates("") == ()
    bare = parse_candidates("nvidia-driver-535\nsome warning\n")
    assert [c.flavour for c in bare] == ["535"] and bare[0].modules is None
    assert parse_wanted("nvidia:550-server") == WantedBranch("550", True, False)
    with pytest.raises(ValueError):
        parse_wanted("latest")


def test_fresh_node_installs_recommended_server_branch(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh_install_fakes(node)
    rc, d, err = install(capsys)
    assert rc == 0, err
    assert d["result"] == "reboot-required" and d["ok"] is True
    assert d["reboot_required"] is True
    assert any("not loaded" in r for r in d["reboot_reasons"])
    assert (d["requested_branch"], d["installed_branch"]) == ("550-server", "550-server")
    assert "nvidia-utils-550-server" in d["packages"]
    assert "success" not in d["message"]
    assert node.mutating_calls() == [
        ["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"],
        ["apt-get", "install", "-y", "nvidia-utils-550-server"],
    ]
    state = node.state_file()
    assert state["requested_branch"] == "550-server"
    assert state["installed_branch"] == "550-server"
    assert state["reboot_required"] is True
    assert "linux-modules-nvidia-550-server-6.8.0-45-generic" in state["packages"]  # type: ignore[operator]
    assert str(state["time"]).endswith("Z")
    assert d["state_file"].endswith("var/lib/gpud/driver.json")


def test_fresh_install_table_says_reboot(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    fresh_install_fakes(node)
    assert main(["driver", "install"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reboot-required: driver 550-server installed; reboot required")
    assert "ran:\n  /usr/bin/env DEBIAN_FRONTEND=noninteractive ubuntu-drivers install" in out


def test_already_installed_and_loaded_does_nothing(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.dpkg("dpkg-550-server-signed")
    node.load("proc-driver-nvidia-version-550-open")
    for args in ((), ("--branch", "550")):
        rc, d, _ = install(capsys, *args)
        assert rc == 0
        assert d["result"] == "already-installed" and d["reboot_required"] is False
        assert d["message"].startswith("already installed")
        assert d["installed_branch"] == "550-server"
    assert node.mutating_calls() == []
    assert not (node.root / "var/lib/gpud/driver.json").exists()


def test_other_branch_loaded_is_refused_with_manual_command(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.dpkg("dpkg-550-server-signed")
    node.load("proc-driver-nvidia-version-550-open")
    rc, d, err = install(capsys, "--branch", "535")
    assert rc == 1
    assert d["result"] == "refused"
    assert "driver 550-server is installed and loaded" in d["message"]
    assert "sudo apt-get purge -y nvidia-headless-no-dkms-550-server" in d["fix"]
    assert "sudo ubuntu-drivers install --gpgpu nvidia:535-server" in d["fix"]
    assert "fix: to replace it by hand" in err
    assert node.mutating_calls() == []


def test_exit_0_but_nothing_installed_fails(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    (node.state / "ud.err").write_text(
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt)\n"
    )
    rc, d, err = install(capsys)
    assert rc == 1
    assert d["result"] == "failed"
    assert d["message"].startswith("ubuntu-drivers ran but installed nothing")
    assert "Could not get lock" in d["output_tail"] and "Could not get lock" in err
    assert "fix: " in err
    # apt-get for the utils is not run on top of a failed driver install
    assert node.mutating_calls() == [["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"]]
    assert node.state_file()["result"] == "failed"


def test_apt_failure(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.dpkg("dpkg-550-server-no-utils", "after-ud")
    (node.state / "apt-fail").write_text(
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 "
        "(unattended-upgr)\n"
    )
    rc, d, err = install(capsys)
    assert rc == 1 and d["result"] == "failed"
    assert "apt-get install nvidia-utils-550-server failed (exit 100)" in d["message"]
    assert "dpkg lock" in d["fix"]
    assert "Could not get lock" in err


def test_transitional_package_pulls_another_branch(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    (node.state / "list.out").write_text(
        "nvidia-driver-565-server, (kernel modules provided by "
        "linux-modules-nvidia-565-server-generic)\n"
        "nvidia-driver-580-server, (kernel modules provided by "
        "linux-modules-nvidia-580-server-generic)\n"
    )
    node.dpkg_text(TRANSITIONAL_565, "after-ud")
    node.dpkg_text(
        TRANSITIONAL_565
        + "nvidia-utils-565-server 565.57.01-0ubuntu0.24.04.1 ii \n"
        + "nvidia-utils-580-server 580.95.05-0ubuntu0.24.04.1 ii \n",
        "after-apt",
    )
    rc, d, _ = install(capsys, "--branch", "565")
    assert rc == 0
    assert (d["requested_branch"], d["installed_branch"]) == ("565-server", "580-server")
    assert any("transitional" in n for n in d["notes"])
    assert node.state_file()["installed_branch"] == "580-server"
    # asking again for 565 is idempotent: nothing installed, only the reboot still pending
    before = len(node.mutating_calls())
    rc, d, _ = install(capsys, "--branch", "565")
    assert rc == 0 and d["result"] == "reboot-required"
    assert len(node.mutating_calls()) == before


def test_no_gpu(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.listing("ubuntu-drivers-list-gpgpu-no-gpu.out")
    rc, d, err = install(capsys)
    assert rc == 1 and d["result"] == "refused"
    assert d["message"].startswith("no NVIDIA GPU found by ubuntu-drivers")
    assert "lspci" in err
    assert node.mutating_calls() == []


def test_dry_run_changes_nothing(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh_install_fakes(node)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the plan needs no root
    rc, d, _ = install(capsys, "--dry-run")
    assert rc == 0 and d["result"] == "dry-run"
    assert d["commands"] == [
        "/usr/bin/env DEBIAN_FRONTEND=noninteractive ubuntu-drivers install --gpgpu "
        "nvidia:550-server",
        "/usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y nvidia-utils-550-server",
    ]
    assert node.mutating_calls() == []
    assert ["ubuntu-drivers", "list", "--gpgpu"] in node.tools.calls()
    assert not (node.root / "var/lib/gpud").exists()


def test_not_root(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["driver", "install"]) == 1
    assert "run as root" in capsys.readouterr().err
    assert node.tools.calls() == []


def test_bad_branch_is_invalid(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["driver", "install", "--branch", "newest"]) == 2
    assert "is not a driver branch" in capsys.readouterr().err


def test_secure_boot_dkms_reboot_reason_names_mok(node: Node) -> None:
    """DKMS under Secure Boot: a reboot alone is not enough, the MOK must be enrolled."""
    from gpud.host.driver_install import after_install_reboot

    node.tools.add_golden("mokutil", "mokutil-enabled")
    node.dpkg("dpkg-535-dkms")
    reasons = after_install_reboot(driver_status(node.root))
    assert any("mokutil --import" in r for r in reasons)


def test_plan_is_pure_over_status(node: Node) -> None:
    node.dpkg("dpkg-none")
    st = driver_status(node.root)
    cands = parse_candidates(golden("ubuntu-drivers-list-gpgpu-noble-h100.out"))
    plan = plan_install(st, None, cands)
    assert plan.action == "install" and plan.candidate is not None
    assert plan.candidate.flavour == "550-server"
    missing_tool = plan_install(st, None, None)
    assert missing_tool.action == "refuse" and "ubuntu-drivers-common" in (missing_tool.fix or "")


def test_gpudctl_process_dry_run(node: Node) -> None:
    env = {**os.environ, "PATH": node.tools.path, "GPUD_ROOT": str(node.root)}
    proc = subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "driver", "install", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dry-run: would install driver 550-server")
    assert "would run:" in proc.stdout
