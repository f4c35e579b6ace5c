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
    parse_listing,
    parse_wanted,
    plan_install,
)
from tests.support.fakehost import GOLDEN, FakeTools, golden, mkdir, write
from tests.support.locks import (
    HOLDER_NAME,
    LockHolder,
    real_apt_get,
    real_apt_with_gpud_options,
)

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
        self.tmp = tmp
        self.tools = FakeTools(tmp / "tools")
        s = str(self.state)
        self.tools.add_script(
            "dpkg-query", f'/bin/cat "{s}/dpkg.out"; /bin/cat "{s}/dpkg.err" >&2; exit 1'
        )
        self.fake_installers()
        self.tools.add_golden("mokutil", "mokutil-disabled")
        self.tools.add("systemctl", "inactive\n", rc=3)
        self.dpkg("dpkg-none")
        self.listing("ubuntu-drivers-list-gpgpu-noble-h100.out")
        monkeypatch.setenv("PATH", self.tools.path)
        monkeypatch.setenv("GPUD_ROOT", str(self.root))
        monkeypatch.setattr(os, "geteuid", lambda: 0)

    def fake_installers(self, real_locks: bool = False) -> None:
        """ubuntu-drivers and apt-get; with ``real_locks``, both first take dpkg's locks with
        the real apt-get: ubuntu-drivers' own apt-get waits for no lock (and ubuntu-drivers
        exits 0 whatever apt said), apt-get as long as gpud's ``-o DPkg::Lock::Timeout`` says."""
        s = str(self.state)
        ud_locks = f"{real_apt_get(self.root)} check >/dev/null || exit 0\n" if real_locks else ""
        apt_locks = real_apt_with_gpud_options(self.root) if real_locks else ""
        self.tools.add_script(
            "ubuntu-drivers",
            f'case "$1" in\n'
            '  list) case " $* " in *" --include-dkms "*)\n'
            f'      [ -f "{s}/list-dkms.out" ] && {{ /bin/cat "{s}/list-dkms.out"; exit 0; }} ;;\n'
            "    esac\n"
            f'    /bin/cat "{s}/list.out" ;;\n'
            f"  install) {ud_locks}"
            f'    /bin/cat "{s}/ud.out" 2>/dev/null; /bin/cat "{s}/ud.err" >&2 2>/dev/null\n'
            f'    if [ -f "{s}/after-ud.out" ]; then /bin/cp "{s}/after-ud.out" "{s}/dpkg.out"; '
            f'/bin/cp "{s}/after-ud.err" "{s}/dpkg.err"; fi ;;\n'
            "esac\nexit 0",
        )
        self.tools.add_script(
            "apt-get",
            f'if [ -f "{s}/apt-fail" ]; then /bin/cat "{s}/apt-fail" >&2; exit 100; fi\n'
            + apt_locks
            + f'if [ -f "{s}/after-apt.out" ]; then /bin/cp "{s}/after-apt.out" "{s}/dpkg.out"; '
            f'/bin/cp "{s}/after-apt.err" "{s}/dpkg.err"; fi\nexit 0',
        )

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


def dkms_install_fakes(node: Node) -> None:
    """A kernel without prebuilt modules: ubuntu-drivers says so, and --include-dkms lists
    and installs the DKMS-built modules."""
    node.listing("ubuntu-drivers-list-gpgpu-needs-dkms.out")
    shutil.copy(GOLDEN / "ubuntu-drivers-list-gpgpu-include-dkms.out", node.state / "list-dkms.out")
    after = golden("dpkg-550-server-dkms.out")
    node.dpkg_text("".join(x for x in after.splitlines(True) if "-utils-" not in x), "after-ud")
    node.dpkg("dpkg-550-server-dkms", "after-apt")


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
        ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600", "nvidia-utils-550-server"],
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
    (node.state / "ud.err").write_text("E: Unable to locate package nvidia-headless-550-server\n")
    rc, d, err = install(capsys)
    assert rc == 1
    assert d["result"] == "failed"
    assert d["message"].startswith("ubuntu-drivers ran but installed nothing")
    assert "Unable to locate" in d["output_tail"] and "Unable to locate" in err
    assert "fix: " in err
    # apt-get for the utils is not run on top of a failed driver install
    assert node.mutating_calls() == [["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"]]
    assert node.state_file()["result"] == "failed"


def test_ubuntu_drivers_losing_the_lock_is_run_again_then_named(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """ubuntu-drivers' own apt-get waits for no lock: when it loses the race (exit 0 anyway),
    gpud runs it again, a bounded number of times, and names the holder apt named."""
    (node.state / "ud.err").write_text(
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 "
        "(unattended-upgr)\n"
    )
    rc, d, err = install(capsys)
    assert rc == 1 and d["result"] == "failed"
    assert d["message"].startswith(
        "ubuntu-drivers lost the dpkg lock to unattended-upgr (pid 4242)"
    )
    assert d["lock_holder"] == "unattended-upgr (pid 4242)"
    assert "ubuntu-drivers lost the dpkg lock to unattended-upgr (pid 4242)" in err
    assert (
        node.mutating_calls() == [["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"]] * 3
    )


def test_apt_failure(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.dpkg("dpkg-550-server-no-utils", "after-ud")
    (node.state / "apt-fail").write_text(
        "E: Sub-process /usr/bin/dpkg returned an error code (1)\n"
    )
    rc, d, err = install(capsys)
    assert rc == 1 and d["result"] == "failed"
    assert "apt-get install nvidia-utils-550-server failed (exit 100)" in d["message"]
    assert "apt-get install -y nvidia-utils-550-server" in d["fix"]
    assert "returned an error code" in err


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
        "/usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y "
        "-o DPkg::Lock::Timeout=600 nvidia-utils-550-server",
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


# --- the dpkg lock (real locks, real apt-get) --------------------------------------------------


def test_waits_for_the_dpkg_lock_naming_its_holder_then_installs(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """unattended-upgrades holds dpkg's frontend lock: gpud waits, names it, and runs
    ubuntu-drivers (whose own apt-get would fail at once) only once it let go."""
    node.fake_installers(real_locks=True)
    fresh_install_fakes(node)
    lock = node.root / "var/lib/dpkg/lock-frontend"
    with LockHolder(lock, seconds=2.0, scratch=node.tmp) as holder:
        rc, d, err = install(capsys, "--lock-timeout", "120")
    assert rc == 0, err
    assert d["result"] == "reboot-required"
    assert (
        f"gpudctl: waiting for /var/lib/dpkg/lock-frontend, held by {HOLDER_NAME} "
        f"(pid {holder.pid}) (up to 120 s)"
    ) in err
    assert node.mutating_calls() == [
        ["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"],
        ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=120", "nvidia-utils-550-server"],
    ]


def test_a_lock_held_past_the_timeout_installs_nothing_and_names_the_holder(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.fake_installers(real_locks=True)
    fresh_install_fakes(node)
    with LockHolder(node.root / "var/lib/dpkg/lock", scratch=node.tmp) as holder:
        rc, d, err = install(capsys, "--lock-timeout", "1")
    who = f"{HOLDER_NAME} (pid {holder.pid})"
    assert rc == 1 and d["result"] == "failed"
    assert d["message"] == (
        f"ubuntu-drivers install did not run: /var/lib/dpkg/lock is still held by {who} after 1 s"
    )
    assert d["lock_holder"] == who
    assert f"wait for {who} to finish" in d["fix"] and "--lock-timeout" in d["fix"]
    assert f"fix: wait for {who}" in err
    assert node.mutating_calls() == []
    assert node.state_file()["result"] == "failed"


def test_the_real_ubuntu_drivers_failure_without_the_wait(node: Node) -> None:
    """The premise of the tests above: the fake ubuntu-drivers, like the real one, fails on a
    held lock (apt's own words), so an install that passes did wait."""
    node.fake_installers(real_locks=True)
    with LockHolder(node.root / "var/lib/dpkg/lock-frontend", scratch=node.tmp) as holder:
        out = subprocess.run(
            [str(node.tools.bin / "ubuntu-drivers"), "install", "--gpgpu", "nvidia:550-server"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 0  # as ubuntu-drivers: whatever apt said
    assert f"E: Could not get lock {node.root}/var/lib/dpkg/lock-frontend" in out.stderr
    assert f"It is held by process {holder.pid} ({HOLDER_NAME})" in out.stderr


def test_bad_lock_timeout_is_invalid(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["driver", "install", "--lock-timeout", "-5"]) == 2
    assert "--lock-timeout must be 0 or more" in capsys.readouterr().err
    assert node.tools.calls() == []


# --- kernels without prebuilt modules ----------------------------------------------------------


def test_parse_listing_keeps_what_ubuntu_drivers_says_instead_of_drivers() -> None:
    needs = parse_listing(golden("ubuntu-drivers-list-gpgpu-needs-dkms.out"))
    assert needs.candidates == ()
    assert needs.needs_dkms is not None
    assert needs.needs_dkms.startswith("Your running kernel (6.12.9-custom) requires DKMS modules")
    dkms = parse_listing(golden("ubuntu-drivers-list-gpgpu-include-dkms.out"))
    assert [c.flavour for c in dkms.candidates] == [
        "570-server",
        "550-server",
        "550-server-open",
        "535-server",
    ]
    assert dkms.candidates[1].modules == "nvidia-dkms-550-server" and dkms.needs_dkms is None
    plain = parse_listing(golden("ubuntu-drivers-list-gpgpu-noble-h100.out"))
    assert plain.needs_dkms is None and len(plain.candidates) == 8


def test_kernel_without_prebuilt_modules_says_so_and_offers_include_dkms(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    dkms_install_fakes(node)
    rc, d, err = install(capsys)
    assert rc == 1 and d["result"] == "refused"
    assert "no NVIDIA GPU" not in d["message"]
    assert d["message"].startswith(
        f"Canonical ships no prebuilt NVIDIA modules for the running kernel {KERNEL}"
    )
    assert "Your running kernel (6.12.9-custom) requires DKMS modules" in d["message"]
    assert "sudo gpudctl driver install --include-dkms" in d["fix"]
    assert "driver.includeDkms: true" in d["fix"]
    assert "fix: build them with DKMS: sudo gpudctl driver install --include-dkms" in err
    assert node.mutating_calls() == []


def test_an_empty_list_that_only_dkms_fills_is_said_too(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """Newer ubuntu-drivers leave out, without a word, the drivers whose modules only DKMS
    provides for this kernel: gpud asks again with --include-dkms before saying "no GPU"."""
    dkms_install_fakes(node)
    node.listing("ubuntu-drivers-list-gpgpu-no-gpu.out")
    rc, d, _ = install(capsys)
    assert rc == 1 and d["result"] == "refused"
    assert d["message"].startswith("Canonical ships no prebuilt NVIDIA modules")
    assert "with --include-dkms it lists nvidia-driver-570-server, " in d["message"]
    assert ["ubuntu-drivers", "list", "--gpgpu", "--include-dkms"] in node.tools.calls()
    assert node.mutating_calls() == []


def test_include_dkms_lists_and_installs_with_it(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    dkms_install_fakes(node)
    rc, d, err = install(capsys, "--include-dkms", "--branch", "550")
    assert rc == 0, err
    assert d["result"] == "reboot-required" and d["installed_branch"] == "550-server"
    assert ["ubuntu-drivers", "list", "--gpgpu", "--include-dkms"] in node.tools.calls()
    assert node.mutating_calls() == [
        ["ubuntu-drivers", "install", "--gpgpu", "--include-dkms", "nvidia:550-server"],
        ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600", "nvidia-utils-550-server"],
    ]
    assert "nvidia-dkms-550-server" in d["packages"]
    assert d["mok_enrollment_required"] is False  # Secure Boot is off here


# --- Secure Boot with DKMS-built modules -------------------------------------------------------


def secure_boot(node: Node, key_state: str | None) -> None:
    """Secure Boot on; DKMS's certificate absent (None) or as ``mokutil --test-key`` says."""
    enabled = golden("mokutil-enabled.out")
    answer = golden(f"mokutil-test-key-{key_state}.out") if key_state else ""
    (node.state / "sb.out").write_text(enabled)
    (node.state / "key.out").write_text(answer)
    s = str(node.state)
    node.tools.add_script(
        "mokutil",
        f'case "$1" in --test-key) /bin/cat "{s}/key.out";; *) /bin/cat "{s}/sb.out";; esac',
    )
    if key_state:
        write(node.root, "/var/lib/shim-signed/mok/MOK.der", "certificate")


def test_secure_boot_and_an_unenrolled_dkms_key_reports_the_mok_steps(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    dkms_install_fakes(node)
    secure_boot(node, "not-enrolled")
    rc, d, err = install(capsys, "--include-dkms", "--branch", "550")
    assert rc == 0, err  # the driver is installed; what comes next is the operator's
    assert d["result"] == "mok-enrollment-required"
    assert d["mok_enrollment_required"] is True
    assert "A reboot alone does not load them" in d["message"]
    key = "/var/lib/shim-signed/mok/MOK.der"
    assert d["mok_steps"][0] == f"sudo mokutil --import {key} (it asks for a one-time password)"
    assert "MokManager" in d["mok_steps"][1] and "Enroll MOK" in d["mok_steps"][1]
    assert ["mokutil", "--test-key", str(node.root / key.lstrip("/"))] in node.tools.calls()
    assert node.state_file()["mok_enrollment_required"] is True
    assert main(["driver", "install", "--include-dkms", "--branch", "550"]) == 0
    table = capsys.readouterr().out
    assert "Secure Boot: enroll DKMS's signing key (MOK) before the driver can load:" in table
    assert f"  1. sudo mokutil --import {key}" in table
    assert "reboot required:" not in table


def test_mok_states(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """Queued already: only the console reboot is left. No key at all: make it, re-sign,
    enroll. Enrolled: a plain reboot loads the modules."""
    node.dpkg("dpkg-550-server-dkms")
    secure_boot(node, "pending")
    st = driver_status(node.root)
    assert st.facts.mok_key == "pending" and len(st.mok_steps) == 1
    assert st.mok_steps[0].startswith("reboot at the console")
    rc, d, _ = install(capsys)
    assert (rc, d["result"]) == (0, "mok-enrollment-required")

    (node.root / "var/lib/shim-signed/mok/MOK.der").unlink()
    st = driver_status(node.root)
    assert st.facts.mok_key == "absent"
    assert st.mok_steps[:2] == (
        "create DKMS's signing key: sudo update-secureboot-policy --new-key",
        "rebuild the modules so DKMS signs them: sudo dpkg-reconfigure nvidia-dkms-550-server",
    )
    assert any("DKMS has no signing key" in p.what for p in st.problems)

    secure_boot(node, "enrolled")
    st = driver_status(node.root)
    assert st.facts.mok_key == "enrolled" and st.mok_steps == ()
    rc, d, _ = install(capsys)
    assert (rc, d["result"], d["mok_enrollment_required"]) == (0, "reboot-required", False)
