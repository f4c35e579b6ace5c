"""`gpudctl toolkit install|status|cdi` against fake dpkg-query/apt-cache/apt-get/nvidia-ctk.

The fake tools share a small state directory, so they answer like a real node whose state changes:
``apt-get update`` makes the package known only once the list file exists, ``apt-get install``
makes dpkg list it. Every call is logged (order included) by :class:`FakeTools`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.host.cdi import generate_spec, parse_spec, refresh_after_mig_change, spec_problems
from gpud.host.commands import run_command
from gpud.host.containerd import RuntimeOptions, configure
from gpud.host.toolkit import inspect
from gpud.host.toolkit_install import (
    LIST_FILE,
    InstallError,
    parse_candidate,
    parse_dpkg_version,
    plan,
    source_line,
)
from tests.support.fakehost import GOLDEN, FakeTools, golden, write
from tests.support.locks import HOLDER_NAME, LockHolder, real_apt_with_gpud_options, take_lock_for

KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
SOURCE = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /"
CONFIG = """\
# operator's containerd config
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"""
SPEC_NAMES = [
    "nvidia.com/gpu=0",
    "nvidia.com/gpu=GPU-6f2a3c1e-8d4b-4f0a-9b7e-2c5d1a0e9f31",
    "nvidia.com/gpu=1",
    "nvidia.com/gpu=GPU-b81d4e72-3a9c-4e15-8f60-7d2b9c4a1e08",
    "nvidia.com/gpu=all",
]


class Node:
    """A fake node: root tree, state directory, stateful fake tools first and only on PATH."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.state = base / "state"
        self.root.mkdir()
        self.state.mkdir()
        self.tools = FakeTools(base / "tools")
        self.base = base
        s = shlex.quote(str(self.state))
        policy = shlex.quote(str(GOLDEN / "apt-cache-policy-toolkit.out"))
        self.tools.add_script(
            "dpkg-query",
            f"if [ -f {s}/installed ]; then printf '%s ii \\n' \"$(/bin/cat {s}/installed)\";"
            " exit 0; fi\n"
            "echo 'dpkg-query: no packages found matching nvidia-container-toolkit' >&2; exit 1",
        )
        self.tools.add_script("apt-cache", f"[ -f {s}/candidate ] && /bin/cat {policy}\nexit 0")
        self.fake_apt_get()
        self.tools.add("systemctl", "active\n")
        self.env = {**os.environ, "PATH": self.tools.path, "GPUD_ROOT": str(self.root)}

    def fake_apt_get(self, update: str = "", install: str = "") -> None:
        """apt-get whose update makes the package known once the list file exists and whose
        install makes dpkg list it; ``update``/``install`` are shell lines run first."""
        s, lst = shlex.quote(str(self.state)), shlex.quote(str(self.root / LIST_FILE.lstrip("/")))
        self.tools.add_script(
            "apt-get",
            'case "$1" in\n'
            f"update) {update}if [ -f {s}/update-fails ]; then"
            " echo 'E: Failed to fetch https://nvidia.github.io/x/InRelease  403  Forbidden' >&2;"
            " exit 100; fi\n"
            f"  [ -f {lst} ] && : > {s}/candidate; exit 0;;\n"
            f"install) {install}if [ -f {s}/install-fails ]; then"
            " echo 'E: Sub-process /usr/bin/dpkg returned an error code (1)' >&2; exit 100; fi\n"
            f"  [ -f {s}/candidate ] || {{ echo 'E: Unable to locate package' >&2; exit 100; }}\n"
            f"  [ -f {s}/install-lies ] || echo 1.17.8-1 > {s}/installed; exit 0;;\n"
            "esac\nexit 0",
        )

    def flag(self, name: str, text: str = "") -> None:
        (self.state / name).write_text(text)

    def add_ctk(self) -> None:
        spec = shlex.quote(str(GOLDEN / "cdi-nvidia-2gpu.yaml"))
        err = shlex.quote(str(GOLDEN / "nvidia-ctk-cdi-no-nvml.err"))
        s = shlex.quote(str(self.state))
        self.tools.add_script(
            "nvidia-ctk",
            'out=""\nfor a in "$@"; do case "$a" in --output=*) out="${a#--output=}";; esac; done\n'
            f"if [ -f {s}/ctk-fails ]; then /bin/cat {err} >&2; exit 1; fi\n"
            f'/bin/cat {spec} > "$out"',
        )
        self.tools.add("nvidia-container-runtime")

    def gpudctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpud.cli.gpudctl", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )

    def names(self) -> list[str]:
        return [call[0] + (" " + call[1] if len(call) > 1 else "") for call in self.tools.calls()]

    def gpud_yaml(self, source: str | None = SOURCE, keyring: str | None = KEYRING) -> None:
        lines = ["version: v1", "toolkit:"]
        if source:
            lines.append(f"  aptSource: '{source}'")
        if keyring:
            lines.append(f"  keyring: {keyring}")
            write(self.root, keyring, "key")
        write(self.root, "/etc/gpud/gpud.yaml", "\n".join(lines) + "\n")


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


# --- pure decisions -----------------------------------------------------------------------------


def test_parsers() -> None:
    assert parse_candidate(golden("apt-cache-policy-toolkit.out")) == "1.17.8-1"
    assert parse_candidate("nvidia-container-toolkit:\n  Candidate: (none)\n") is None
    assert parse_candidate("") is None
    assert parse_dpkg_version("1.17.8-1 ii \n") == "1.17.8-1"
    assert parse_dpkg_version("1.17.8-1 rc \n") is None


def test_source_line_always_signed() -> None:
    key = Path(KEYRING)
    assert source_line(SOURCE, key) == f"deb [signed-by={KEYRING}] {SOURCE}"
    bare = "https://mirror.example/nvidia"
    assert source_line(bare, key) == f"deb [signed-by={KEYRING}] {bare} /"
    assert (
        source_line("deb [arch=amd64] https://m.example/ubuntu noble main", key)
        == f"deb [arch=amd64 signed-by={KEYRING}] https://m.example/ubuntu noble main"
    )
    signed = f"deb [signed-by={KEYRING}] {SOURCE}"
    assert source_line(signed, None) == signed
    with pytest.raises(InstallError, match=r"toolkit\.keyring"):
        source_line(SOURCE, None)
    with pytest.raises(InstallError, match=r"toolkit\.keyring"):
        source_line("deb [signed-by=/other.gpg] https://x /", key)


def test_plan() -> None:
    assert plan("1.17.8-1", None, None) == ()
    assert plan(None, "1.17.8-1", None) == ("install",)
    assert plan(None, None, "deb …") == ("add-source", "update", "install")
    with pytest.raises(InstallError) as exc:
        plan(None, None, None)
    assert "toolkit.aptSource" in exc.value.fix and "toolkit.keyring" in exc.value.fix


# --- toolkit install ----------------------------------------------------------------------------


def test_fresh_node_with_a_candidate_installs_and_verifies(node: Node) -> None:
    node.flag("candidate")
    done = node.gpudctl("toolkit", "install", "-o", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["version"] == "1.17.8-1" and data["steps"] == ["install"]
    assert node.names() == ["dpkg-query -W", "apt-cache policy", "apt-get install", "dpkg-query -W"]
    assert not (node.root / LIST_FILE.lstrip("/")).exists()


def test_no_candidate_and_no_source_names_the_config_keys(node: Node) -> None:
    done = node.gpudctl("toolkit", "install")
    assert done.returncode == 1
    assert "toolkit.aptSource" in done.stderr and "toolkit.keyring" in done.stderr
    assert "nvidia.github.io/libnvidia-container" in done.stderr
    assert not [c for c in node.tools.calls() if c[0] == "apt-get"]


def test_source_configured_writes_the_list_then_updates_then_installs(node: Node) -> None:
    node.gpud_yaml()
    done = node.gpudctl("toolkit", "install")
    assert done.returncode == 0, done.stderr
    assert "1.17.8-1: installed" in done.stdout
    listed = node.root / LIST_FILE.lstrip("/")
    assert listed.read_text() == f"deb [signed-by={KEYRING}] {SOURCE}\n"
    assert listed.stat().st_mode & 0o777 == 0o644
    assert node.names() == [
        "dpkg-query -W",
        "apt-cache policy",
        "apt-get update",
        "apt-cache policy",
        "apt-get install",
        "dpkg-query -W",
    ]
    install = node.tools.calls()[4]
    assert install[-1] == "nvidia-container-toolkit" and "-y" in install
    assert node.tools.calls()[2] == ["apt-get", "update", "-o", "DPkg::Lock::Timeout=600"]
    assert install[:5] == ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600"]


def test_dry_run_changes_nothing(node: Node) -> None:
    node.gpud_yaml()
    done = node.gpudctl("toolkit", "install", "--dry-run", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == ["add-source", "update", "install"]
    assert node.names() == ["dpkg-query -W", "apt-cache policy"]
    assert not (node.root / LIST_FILE.lstrip("/")).exists()


def test_already_installed_runs_no_apt(node: Node) -> None:
    node.flag("installed", "1.17.8-1")
    done = node.gpudctl("toolkit", "install")
    assert done.returncode == 0
    assert "already installed" in done.stdout
    assert node.names() == ["dpkg-query -W"]


@pytest.mark.parametrize("failure", ["update-fails", "install-fails"])
def test_apt_failure_exits_1_with_its_message_and_removes_the_list(
    node: Node, failure: str
) -> None:
    node.gpud_yaml()
    node.flag(failure)
    done = node.gpudctl("toolkit", "install")
    assert done.returncode == 1
    assert ("403  Forbidden" if failure == "update-fails" else "dpkg returned") in done.stderr
    assert not (node.root / LIST_FILE.lstrip("/")).exists()
    assert not list((node.root / LIST_FILE.lstrip("/")).parent.glob(".*tmp"))


def test_apt_success_without_the_package_is_not_believed(node: Node) -> None:
    node.flag("candidate")
    node.flag("install-lies")
    done = node.gpudctl("toolkit", "install")
    assert done.returncode == 1
    assert "dpkg does not list" in done.stderr


def test_missing_keyring_file_is_refused_before_any_write(node: Node) -> None:
    node.gpud_yaml()
    (node.root / KEYRING.lstrip("/")).unlink()
    done = node.gpudctl("toolkit", "install")
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert "apt-get" not in " ".join(node.names())


def test_update_waits_for_the_lists_lock_that_apt_itself_does_not_wait_for(node: Node) -> None:
    """``apt-get update`` fails at once on a held lists lock whatever DPkg::Lock::Timeout says
    (the fake runs the real one with gpud's options): gpud's own wait is what gets it through."""
    node.gpud_yaml()
    node.fake_apt_get(update=real_apt_with_gpud_options(node.root, "update"))
    with LockHolder(node.root / "var/lib/apt/lists/lock", 2.0, scratch=node.base) as holder:
        done = node.gpudctl("toolkit", "install")
    assert done.returncode == 0, done.stderr
    assert (
        f"gpudctl: waiting for /var/lib/apt/lists/lock, held by {HOLDER_NAME} (pid {holder.pid})"
    ) in done.stderr
    assert "apt-get update" in node.names() and node.names()[-2] == "apt-get install"


def test_install_waits_with_apt_for_a_lock_taken_after_gpud_looked(node: Node) -> None:
    """unattended-upgrades takes dpkg's lock between gpud's look and apt-get's start: apt-get
    must wait itself, which only gpud's -o DPkg::Lock::Timeout makes it do."""
    node.flag("candidate")
    frontend = node.root / "var/lib/dpkg/lock-frontend"
    node.fake_apt_get(
        install=take_lock_for(frontend, 1.5, node.base) + real_apt_with_gpud_options(node.root)
    )
    done = node.gpudctl("toolkit", "install", "--lock-timeout", "60")
    assert done.returncode == 0, done.stderr
    assert "1.17.8-1: installed" in done.stdout
    install = next(c for c in node.tools.calls() if c[:2] == ["apt-get", "install"])
    assert install[3:5] == ["-o", "DPkg::Lock::Timeout=60"]


def test_a_lock_held_past_apt_lock_timeout_fails_naming_its_holder(node: Node) -> None:
    node.gpud_yaml()
    config = node.root / "etc/gpud/gpud.yaml"
    config.write_text(config.read_text() + "apt:\n  lockTimeout: 1\n")
    with LockHolder(node.root / "var/lib/dpkg/lock", scratch=node.base) as holder:
        done = node.gpudctl("toolkit", "install")
    who = f"{HOLDER_NAME} (pid {holder.pid})"
    assert done.returncode == 1
    assert (
        f"'apt-get update' did not run: /var/lib/dpkg/lock is still held by {who} after 1 s"
    ) in done.stderr
    assert f"wait for {who} to finish" in done.stderr
    assert not [c for c in node.tools.calls() if c[0] == "apt-get"]
    assert not (node.root / LIST_FILE.lstrip("/")).exists()


def test_install_refuses_non_root(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from gpud.cli import gpudctl as cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["toolkit", "install"]) == 1
    assert "run as root" in capsys.readouterr().err


# --- toolkit status -----------------------------------------------------------------------------


def containerd_config(node: Node, text: str) -> Path:
    return write(node.root, "/etc/containerd/config.toml", text)


def test_status_on_a_configured_node(node: Node) -> None:
    node.flag("installed", "1.17.8-1")
    node.add_ctk()
    options = RuntimeOptions(set_as_default=True, enable_cdi=True)
    containerd_config(node, configure(CONFIG, options).text)
    write(node.root, "/var/run/cdi/nvidia.yaml", golden("cdi-nvidia-2gpu.yaml"))
    done = node.gpudctl("toolkit", "status", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["package"] == {
        "name": "nvidia-container-toolkit",
        "installed": True,
        "version": "1.17.8-1",
        "error": None,
    }
    assert data["binaries"]["nvidia-ctk"].endswith("/nvidia-ctk")
    ctr = data["containerd"]
    assert ctr["config"] == "/etc/containerd/config.toml"
    assert (ctr["nvidia_runtime"], ctr["default_runtime"], ctr["enable_cdi"]) == (True,) * 3
    assert data["cdi"]["/var/run/cdi/nvidia.yaml"]["devices"] == SPEC_NAMES
    assert data["cdi"]["/etc/cdi/nvidia.yaml"]["exists"] is False
    assert data["problems"] == []
    table = node.gpudctl("toolkit", "status")
    assert "nvidia.com/gpu=all" in table.stdout and table.returncode == 0


def test_status_on_an_unconfigured_node_says_how_to_fix(node: Node) -> None:
    containerd_config(node, CONFIG)
    done = node.gpudctl("toolkit", "status", "-o", "json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    ctr = data["containerd"]
    assert (ctr["nvidia_runtime"], ctr["default_runtime"], ctr["enable_cdi"]) == (
        False,
        False,
        None,
    )
    fixes = [p["fix"] for p in data["problems"]]
    assert "sudo gpudctl toolkit install" in fixes
    assert "sudo gpudctl toolkit configure" in fixes
    assert (node.root / "etc/containerd/config.toml").read_text() == CONFIG


def test_status_reports_invalid_toml_without_crashing(node: Node) -> None:
    node.flag("installed", "1.17.8-1")
    node.add_ctk()
    containerd_config(node, "version = 2\n[plugins\n")
    done = node.gpudctl("toolkit", "status", "-o", "json")
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    assert "not valid TOML" in data["containerd"]["error"]
    assert data["containerd"]["nvidia_runtime"] is None
    assert any("not valid TOML" in p["message"] for p in data["problems"])


def test_status_uses_microk8s_template(node: Node) -> None:
    node.flag("installed", "1.17.8-1")
    node.add_ctk()
    write(node.root, "/snap/microk8s/current/meta/snap.yaml", "name: microk8s\n")
    write(node.root, "/var/snap/microk8s/current/args/containerd-template.toml", CONFIG)
    data = json.loads(node.gpudctl("toolkit", "status", "-o", "json").stdout)
    assert data["containerd"]["config"].endswith("args/containerd-template.toml")
    assert data["containerd"]["nvidia_runtime"] is False


def test_status_agrees_with_configure(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"

    def state(text: str) -> tuple[bool | None, bool | None, bool | None]:
        config.write_text(text)
        report = inspect(config)
        return report.configured, report.default, report.cdi

    # Without a containerd binary, an unset enable_cdi is unknown: 1.7 is off, 2.x on.
    assert state(CONFIG) == (False, False, None)
    assert state(configure(CONFIG).text) == (True, False, None)
    assert state(configure(CONFIG, RuntimeOptions(enable_cdi=True)).text) == (True, False, True)


# --- CDI ----------------------------------------------------------------------------------------


def test_parse_the_golden_spec() -> None:
    kind, names = parse_spec(golden("cdi-nvidia-2gpu.yaml"))
    assert kind == "nvidia.com/gpu" and list(names) == SPEC_NAMES
    assert spec_problems(kind, names) == ()
    assert spec_problems(kind, ("nvidia.com/gpu=all",))
    assert spec_problems("nvidia.com/other", names)


def test_cdi_generate_writes_the_spec(node: Node) -> None:
    node.add_ctk()
    done = node.gpudctl("toolkit", "cdi", "-o", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    out = node.root / "var/run/cdi/nvidia.yaml"
    assert data["status"] == "generated" and data["path"] == str(out)
    assert data["devices"] == SPEC_NAMES
    assert out.read_text() == golden("cdi-nvidia-2gpu.yaml")
    call = node.tools.calls()[-1]
    assert call == ["nvidia-ctk", "cdi", "generate", f"--output={out}", "--format=yaml"]


def test_cdi_explicit_output(node: Node, tmp_path: Path) -> None:
    node.add_ctk()
    out = tmp_path / "elsewhere" / "nvidia.yaml"
    done = node.gpudctl("toolkit", "cdi", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert out.exists() and "nvidia.com/gpu=all" in done.stdout


def test_cdi_without_nvidia_ctk_is_skipped(node: Node) -> None:
    done = node.gpudctl("toolkit", "cdi", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["message"] == "skipped: nvidia-ctk not installed"


def test_cdi_failure_exits_1_with_nvidia_ctk_stderr(node: Node) -> None:
    node.add_ctk()
    node.flag("ctk-fails")
    done = node.gpudctl("toolkit", "cdi")
    assert done.returncode == 1
    assert "failed to initialize NVML: ERROR_LIBRARY_NOT_FOUND" in done.stderr
    assert not (node.root / "var/run/cdi/nvidia.yaml").exists()


def test_refresh_hook_in_process(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.add_ctk()
    monkeypatch.setenv("PATH", node.tools.path)
    out = node.root / "run/cdi/nvidia.yaml"
    result = refresh_after_mig_change(run_command, out)
    assert result.status == "generated" and result.devices[-1] == "nvidia.com/gpu=all"
    # nvidia-ctk exiting 0 without writing is not believed.
    node.tools.add("nvidia-ctk")
    out.unlink()
    assert generate_spec(run_command, out).status == "failed"
