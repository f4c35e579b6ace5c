"""The NVIDIA runtime in containerd's config, checked by the real containerd.

Every config gpud writes is loaded with ``containerd --config FILE config dump`` (Debian's
containerd 1.6, installed by scripts/setup), and the effective nvidia runtime is compared with what
``nvidia-ctk runtime configure`` gives for the same input and flags
(shared/reference/nvidia-ctk-rules.md). containerd 1.6 does not know config version 3, so for the
containerd 2 default config the dump only proves that Go's TOML parser accepts the file, and the
runtime is checked on the file itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from gpud.host.containerd import ConfigError, RuntimeOptions, configure, read_toml
from gpud.host.toolkit import (
    RestartError,
    command_restarter,
    configure_file,
    target_for,
)
from tests.conftest import shared_fixture, unavailable

BINARY = "/usr/bin/nvidia-container-runtime"
RUNC_V2 = "io.containerd.runc.v2"

V1_CONFIG = """\
# A legacy version 1 config: no version key.
root = "/var/lib/containerd"

[plugins]
  [plugins.cri]
    # the pause image
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins.cri.containerd]
      snapshotter = "overlayfs"
      [plugins.cri.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.cri.containerd.runtimes.runc.options]
          SystemdCgroup = true  # the kubelet uses the systemd cgroup driver
    [plugins.cri.registry.auths."registry.example.com"]
      username = "robot"
      password = "s3cret"
"""

MICROK8S_RENDER = {
    "${SNAP}": "/snap/microk8s/current",
    "${SNAP_DATA}": "/var/snap/microk8s/current",
    "${SNAPSHOTTER}": "overlayfs",
    "${RUNTIME}": "runc",
    "${RUNTIME_TYPE}": RUNC_V2,
}

OPTIONS = {
    "plain": RuntimeOptions(),
    "default": RuntimeOptions(set_as_default=True),
    "cdi": RuntimeOptions(enable_cdi=True),
}
FIXTURES = ("debian16", "containerd2", "v1", "microk8s")

# What nvidia-ctk gives, per nvidia-ctk-rules.md, as the effective nvidia runtime after
# containerd loads the result (v1.17.8 in place for MicroK8s and v1, which is the only way those
# work; v1.20's drop-in for debian16/containerd2). enable_cdi None: containerd 1.6 has no such key,
# so the dump cannot show it.
NVIDIA_CTK: dict[tuple[str, str], dict[str, Any]] = {
    ("debian16", "plain"): {"SystemdCgroup": False, "default": "runc", "enable_cdi": None},
    ("debian16", "default"): {"SystemdCgroup": False, "default": "nvidia", "enable_cdi": None},
    ("debian16", "cdi"): {"SystemdCgroup": False, "default": "runc", "enable_cdi": None},
    ("containerd2", "plain"): {"SystemdCgroup": False, "default": "runc", "enable_cdi": True},
    ("containerd2", "default"): {"SystemdCgroup": False, "default": "nvidia", "enable_cdi": True},
    ("containerd2", "cdi"): {"SystemdCgroup": False, "default": "runc", "enable_cdi": True},
    ("v1", "plain"): {"SystemdCgroup": True, "default": "runc", "enable_cdi": None},
    ("v1", "default"): {"SystemdCgroup": True, "default": "nvidia", "enable_cdi": None},
    ("v1", "cdi"): {"SystemdCgroup": True, "default": "runc", "enable_cdi": None},
    # MicroK8s' runc has no options: SystemdCgroup is not invented.
    ("microk8s", "plain"): {"SystemdCgroup": None, "default": "runc", "enable_cdi": None},
    ("microk8s", "default"): {"SystemdCgroup": None, "default": "nvidia", "enable_cdi": None},
    ("microk8s", "cdi"): {"SystemdCgroup": None, "default": "runc", "enable_cdi": None},
}


def fixture_text(name: str) -> str:
    if name == "v1":
        return V1_CONFIG
    file = {
        "debian16": "containerd1.6-config-default.toml",
        "containerd2": "containerd2-config-default.toml",
        "microk8s": "microk8s-containerd-template.toml",
    }[name]
    return shared_fixture(file).read_text()


def render_microk8s(text: str) -> str:
    """What MicroK8s' run-containerd-with-args does to the template with sed, on every start."""
    for placeholder, value in MICROK8S_RENDER.items():
        text = text.replace(placeholder, value)
    return text


# containerd 2 loads version 3 configs (1.6 drops their CRI plugin from its dump); scripts/setup
# fetches Debian's newer containerd package and unpacks it here, without installing it.
CONTAINERD2 = Path(__file__).resolve().parent.parent / ".cache/containerd2/usr/bin/containerd"


def containerd2() -> str:
    if CONTAINERD2.exists():
        return str(CONTAINERD2)
    unavailable(f"{CONTAINERD2} not fetched (scripts/setup could not reach a containerd 2 package)")


def containerd_dump(path: Path, exe: str | None = None) -> dict[str, Any]:
    exe = exe or shutil.which("containerd")
    if exe is None:
        pytest.fail(
            "containerd is not installed: run scripts/setup (it installs Debian's containerd "
            "package, whose binary these tests use to load every config gpud writes)"
        )
    done = subprocess.run(
        [exe, "--config", str(path), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"containerd rejected {path}:\n{done.stderr}"
    return read_toml(done.stdout)


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\$\{[A-Z_]+\}", text))


# --- the effective config, fixture x options ----------------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_containerd_loads_the_nvidia_runtime_nvidia_ctk_would_give(tmp_path, fixture, option):
    source = fixture_text(fixture)
    edit = configure(source, OPTIONS[option])
    assert edit.changed
    text = render_microk8s(edit.text) if fixture == "microk8s" else edit.text
    config = tmp_path / "config.toml"
    config.write_text(text)
    dump = containerd_dump(config)  # every file must load, v3 included
    want = NVIDIA_CTK[(fixture, option)]

    if fixture == "containerd2":
        # containerd 1.6 parses version 3 but drops its plugins: containerd 2 is the judge.
        cri = containerd_dump(config, containerd2())["plugins"]["io.containerd.cri.v1.runtime"]
        assert edit.version == 3
    else:
        cri = dump["plugins"]["io.containerd.grpc.v1.cri"]
        assert edit.version == (1 if fixture == "v1" else 2)
    runtimes = cri["containerd"]["runtimes"]
    nvidia, runc = runtimes["nvidia"], runtimes["runc"]

    assert nvidia["runtime_type"] == RUNC_V2
    assert nvidia["options"]["BinaryName"] == BINARY
    if fixture == "v1":
        assert nvidia["options"]["Runtime"] == BINARY  # nvidia-ctk sets both for version 1
    assert nvidia["options"].get("SystemdCgroup") == want["SystemdCgroup"]
    # Every setting of the template runtime is inherited.
    for key, value in runc.items():
        if key != "options":
            assert nvidia[key] == value, key
    for key, value in runc.get("options", {}).items():
        if key not in ("BinaryName", "Runtime"):
            assert nvidia["options"][key] == value, key
    assert cri["containerd"]["default_runtime_name"] == want["default"]
    if want["enable_cdi"] is not None:
        assert cri["enable_cdi"] is want["enable_cdi"]
    # Better than nvidia-ctk 1.20 on MicroK8s: no placeholder reaches the effective runtime.
    assert "${" not in json.dumps(nvidia)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_comments_survive_and_a_second_run_changes_nothing(fixture, option):
    source = fixture_text(fixture)
    edit = configure(source, OPTIONS[option])
    assert comments(edit.text) == comments(source)
    again = configure(edit.text, OPTIONS[option])
    assert not again.changed
    assert again.text == edit.text
    # Nothing but the changes: every original line is still there, in order.
    lines = iter(edit.text.splitlines())
    changed = {"default_runtime_name"} if option == "default" else set()
    for line in source.splitlines():
        if line.split("=")[0].strip() in changed:
            continue
        assert any(line == other for other in lines), line


def test_microk8s_template_keeps_its_placeholders():
    source = fixture_text("microk8s")
    for name, option in OPTIONS.items():
        text = configure(source, option).text
        lost = {"${RUNTIME}"} if name == "default" else set()
        assert placeholders(text) == placeholders(source) - lost
    # The existing nvidia-container-runtime and kata runtimes are untouched.
    runtimes = read_toml(configure(source).text)["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"
    ]["runtimes"]
    assert runtimes["nvidia-container-runtime"]["options"] == {
        "BinaryName": "nvidia-container-runtime"
    }
    assert runtimes["kata"]["runtime_type"] == "io.containerd.kata.v2"
    assert runtimes["nvidia"] == {
        "runtime_type": "${RUNTIME_TYPE}",
        "options": {"BinaryName": BINARY},
    }


def test_already_configured_text_is_returned_as_is():
    source = configure(fixture_text("debian16")).text
    edit = configure(source)
    assert (edit.changed, edit.text) == (False, source)
    assert edit.text is source


# --- versions and templates ---------------------------------------------------------------------


def test_version_rules():
    empty = configure("")
    assert empty.version == 2 and empty.cri_table == 'plugins."io.containerd.grpc.v1.cri"'
    assert empty.text.startswith("version = 2\n")
    assert configure("# nothing yet\n").version == 2
    assert configure('root = "/x"\n').version == 1
    assert configure('root = "/x"\n').cri_table == "plugins.cri"
    assert configure("version = 3\n").cri_table == 'plugins."io.containerd.cri.v1.runtime"'
    assert configure("version = 4\n").cri_table == 'plugins."io.containerd.cri.v1.runtime"'


def test_empty_config_loads_in_containerd(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(configure("", RuntimeOptions(set_as_default=True)).text)
    cri = containerd_dump(config)["plugins"]["io.containerd.grpc.v1.cri"]
    nvidia = cri["containerd"]["runtimes"]["nvidia"]
    assert nvidia["runtime_type"] == RUNC_V2
    assert nvidia["options"] == {"BinaryName": BINARY}
    assert cri["containerd"]["default_runtime_name"] == "nvidia"


@pytest.mark.parametrize("version", ['"2"', "2.0", "true", "0"])
def test_bad_version_is_refused(version):
    with pytest.raises(ConfigError, match="version") as info:
        configure(f"version = {version}\n")
    assert info.value.line == 1


def test_invalid_toml_is_refused_with_its_position():
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        configure("version = 2\n\n[plugins.\n")
    assert info.value.line == 3


def test_relative_binary_is_refused():
    with pytest.raises(ValueError, match="not an absolute path"):
        RuntimeOptions(binary="my-nvidia-runtime")


def test_template_is_the_default_runtime_unless_it_is_nvidia():
    config = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "crun"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]
  runtime_type = "io.containerd.runc.v2"
  privileged_without_host_devices = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
    BinaryName = "/usr/bin/crun"
    SystemdCgroup = true
"""
    nvidia = runtimes_of(configure(config).text)["nvidia"]
    assert nvidia["privileged_without_host_devices"] is True
    assert nvidia["options"] == {"BinaryName": BINARY, "SystemdCgroup": True}
    as_nvidia = config.replace('"crun"\n', '"nvidia-legacy"\n', 1)
    assert "privileged_without_host_devices" not in runtimes_of(configure(as_nvidia).text)["nvidia"]


def test_no_template_gives_a_plain_runc_v2_entry():
    edit = configure('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "x"\n')
    assert runtimes_of(edit.text)["nvidia"] == {
        "privileged_without_host_devices": False,
        "runtime_type": RUNC_V2,
        "options": {"BinaryName": BINARY},
    }
    assert any("no runc or crun" in note for note in edit.notes)


def test_existing_nvidia_runtime_keeps_operator_keys_and_follows_the_cgroup_driver():
    config = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
  privileged_without_host_devices = true  # operator's choice
  pod_annotations = ["nvidia.com/*"]
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
    BinaryName = "/usr/local/nvidia/toolkit/nvidia-container-runtime"
    SystemdCgroup = false
"""
    edit = configure(config)
    nvidia = runtimes_of(edit.text)["nvidia"]
    assert nvidia == {
        "privileged_without_host_devices": True,
        "pod_annotations": ["nvidia.com/*"],
        "runtime_type": RUNC_V2,
        "options": {"BinaryName": BINARY, "SystemdCgroup": True},
    }
    assert "# operator's choice" in edit.text


def test_default_runtime_is_left_alone_without_set_as_default():
    config = configure(fixture_text("debian16"), RuntimeOptions(set_as_default=True)).text
    edit = configure(config)
    assert not edit.changed
    assert any("already 'nvidia'" in note for note in edit.notes)


# --- layout: line endings, indentation, comments (issue 10, item 9) ------------------------------

INDENTED_KEYS = """version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""


def test_a_crlf_file_stays_crlf_and_loads(tmp_path):
    source = INDENTED_KEYS.replace("\n", "\r\n")
    edit = configure(source, RuntimeOptions(set_as_default=True, enable_cdi=True))
    assert edit.changed
    assert edit.text.count("\n") == edit.text.count("\r\n") > source.count("\r\n")
    assert not configure(edit.text, RuntimeOptions(set_as_default=True, enable_cdi=True)).changed
    config = tmp_path / "config.toml"
    config.write_bytes(edit.text.encode())
    nvidia = containerd_dump(config)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert nvidia["runtimes"]["nvidia"]["options"]["BinaryName"] == BINARY
    # A file with LF endings is not turned into CRLF.
    assert "\r" not in configure(INDENTED_KEYS).text


def test_new_keys_take_their_siblings_indentation():
    text = configure(INDENTED_KEYS, RuntimeOptions(set_as_default=True, enable_cdi=True)).text
    keys = [line for line in text.splitlines() if "=" in line and not line.startswith("version")]
    assert keys and all(line.startswith("  ") and not line.startswith("   ") for line in keys), text
    # Headers indented, keys two further: a new table follows the file, not a fixed rule.
    nested = "\n".join(
        "    " + line if line.startswith("[") else "      " + line if line[:1] == " " else line
        for line in INDENTED_KEYS.splitlines()
    )
    text = configure(nested, RuntimeOptions(set_as_default=True)).text
    for line in text.splitlines()[1:]:
        if line.strip():
            want = "    [" if "[" in line.split("=")[0] else "        "
            assert line.startswith(want) and line[len(want)] != " ", line


def test_comments_of_a_comments_only_file_stay_on_top():
    source = "# Managed by the node image.\n#\n# Add drop-ins to conf.d instead.\n"
    for text in (source, source.replace("#\n", "\n")):
        edit = configure(text)
        head = edit.text.splitlines()[: len(text.splitlines())]
        assert head == text.splitlines(), edit.text
        assert read_toml(edit.text)["version"] == 2


@pytest.mark.parametrize("version", ["5", "99", "-1"])
def test_a_version_no_containerd_reads_is_refused_with_the_ones_it_does(version):
    with pytest.raises(ConfigError) as info:
        configure(f'version = {version}\n[plugins."io.containerd.grpc.v1.cri"]\n')
    message = str(info.value)
    assert f"unsupported config version {version}" in message
    assert "containerd 1.x reads config versions 1 and 2" in message and "up to 4" in message
    assert info.value.line == 1


def runtimes_of(text: str) -> dict[str, Any]:
    return read_toml(text)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]


# --- the file: backup, mode, atomic write -------------------------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_configure_file_backs_up_and_keeps_mode(tmp_path):
    config = tmp_path / "config.toml"
    original = V1_CONFIG.encode()
    config.write_bytes(original)
    config.chmod(0o600)
    restarts = []
    result = configure_file(config, RuntimeOptions(), lambda: restarts.append(1), now=lambda: NOW)
    assert result.changed and result.restarted and restarts == [1]
    assert result.backup == tmp_path / "config.toml.gpud-backup-20260102T030405Z"
    assert result.backup.read_bytes() == original
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.backup.stat().st_mode) == 0o600
    # No other file appears (nvidia-ctk's 0644 drop-in would hold the registry password).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.toml",
        "config.toml.gpud-backup-20260102T030405Z",
    ]
    assert "+++" in result.diff and "BinaryName" in result.diff

    again = configure_file(config, RuntimeOptions(), lambda: restarts.append(2), now=lambda: NOW)
    assert not again.changed and again.backup is None and restarts == [1]
    assert len(list(tmp_path.iterdir())) == 2


def test_configure_file_refuses_invalid_toml_untouched(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n[plugins\n")
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    with pytest.raises(ConfigError):
        configure_file(config, RuntimeOptions(), lambda: pytest.fail("restarted"))
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before
    assert list(tmp_path.iterdir()) == [config]


def test_missing_file_is_created_0644_as_version_2(tmp_path):
    config = tmp_path / "config.toml"
    result = configure_file(config, RuntimeOptions())
    assert result.created and result.backup is None and result.version == 2
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert "nvidia" in runtimes_of(config.read_text())
    with pytest.raises(FileNotFoundError):
        configure_file(tmp_path / "no" / "config.toml", RuntimeOptions())


def test_symlinked_config_is_written_where_it_points(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text(V1_CONFIG)
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    configure_file(link, RuntimeOptions())
    assert link.is_symlink()
    assert "BinaryName" in real.read_text()


def test_failed_restart_is_reported_after_writing(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(V1_CONFIG)

    def restart() -> None:
        raise RestartError("boom")

    result = configure_file(config, RuntimeOptions(), restart)
    assert result.changed and not result.restarted and result.restart_error == "boom"
    assert "BinaryName" in config.read_text()


def test_command_restarter_failures():
    with pytest.raises(RestartError, match="not found"):
        command_restarter(["/nonexistent/systemctl", "restart", "containerd"])()
    with pytest.raises(RestartError, match="exit 3"):
        command_restarter(["sh", "-c", "exit 3"])()


def test_an_explicit_config_is_microk8s_when_it_is_the_template(tmp_path):
    template = tmp_path / "var/snap/microk8s/current/args/containerd-template.toml"
    assert target_for(template).platform == "microk8s"
    assert target_for(tmp_path / "config.toml").platform == "containerd"


# --- the command line ---------------------------------------------------------------------------

FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
exit {code}
"""


@pytest.fixture
def fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"

    def install(code: int = 0, tools: tuple[str, ...] = ("systemctl", "snap")) -> Path:
        for tool in tools:
            script = bin_dir / tool
            script.write_text(FAKE_TOOL.format(log=log, code=code))
            script.chmod(0o755)
        return log

    install.bin_dir = bin_dir  # type: ignore[attr-defined]
    return install


def gpudctl(
    *args: str, bin_dir: Path, path: str | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{path if path is not None else os.environ['PATH']}",
        "GPUD_ROOT": str(bin_dir.parent / "root"),
    }
    return subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        **kwargs,
    )


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_cli_restarts_only_when_changed(tmp_path, fake_tools):
    log = fake_tools()
    config = tmp_path / "config.toml"
    config.write_text(fixture_text("debian16"))
    first = gpudctl("toolkit", "configure", "--config", str(config), bin_dir=fake_tools.bin_dir)
    assert first.returncode == 0, first.stderr
    assert "configured (version 2)" in first.stdout and "backup:" in first.stdout
    assert calls(log) == ["systemctl restart containerd"]
    second = gpudctl(
        "toolkit", "configure", "--config", str(config), "-o", "json", bin_dir=fake_tools.bin_dir
    )
    assert second.returncode == 0, second.stderr
    data = json.loads(second.stdout)
    assert data["changed"] is False and data["restarted"] is False and data["backup"] is None
    assert set(data) >= {"file", "changed", "version", "backup", "restarted", "notes"}
    assert calls(log) == ["systemctl restart containerd"]
    assert not any("daemon-reload" in call for call in calls(log))


def test_cli_json_and_microk8s_restart(tmp_path, fake_tools):
    log = fake_tools()
    template = tmp_path / "containerd-template.toml"
    template.write_text(fixture_text("microk8s"))
    done = gpudctl(
        "toolkit", "configure", "--config", str(template), "--set-as-default", "--cdi",
        "-o", "json", bin_dir=fake_tools.bin_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["file"] == str(template) and data["changed"] and data["version"] == 2
    assert data["restarted"] is True and data["backup"].startswith(str(template))
    assert calls(log) == ["snap restart microk8s.daemon-containerd"]


def test_cli_no_restart(tmp_path, fake_tools):
    log = fake_tools()
    config = tmp_path / "config.toml"
    config.write_text(V1_CONFIG)
    done = gpudctl(
        "toolkit", "configure", "--config", str(config), "--no-restart", bin_dir=fake_tools.bin_dir
    )
    assert done.returncode == 0, done.stderr
    assert "--no-restart" in done.stdout
    assert calls(log) == []


def test_cli_restart_failure_and_missing_tool(tmp_path, fake_tools):
    fake_tools(code=1)
    config = tmp_path / "config.toml"
    config.write_text(V1_CONFIG)
    done = gpudctl("toolkit", "configure", "--config", str(config), bin_dir=fake_tools.bin_dir)
    assert done.returncode == 1
    assert "the config was written; restart containerd yourself" in done.stderr
    assert "BinaryName" in config.read_text()

    empty_bin = tmp_path / "empty"
    empty_bin.mkdir()
    other = tmp_path / "other.toml"
    other.write_text(V1_CONFIG)
    done = gpudctl("toolkit", "configure", "--config", str(other), bin_dir=empty_bin, path="")
    assert done.returncode == 1
    assert "not found" in done.stderr and "restart containerd yourself" in done.stderr


def test_cli_invalid_toml_exit_2_untouched(tmp_path, fake_tools):
    log = fake_tools()
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n[plugins\n")
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    done = gpudctl("toolkit", "configure", "--config", str(config), bin_dir=fake_tools.bin_dir)
    assert done.returncode == 2
    assert "line 2" in done.stderr and "not changed" in done.stderr
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before
    assert calls(log) == []


def test_cli_refuses_non_root(tmp_path, monkeypatch, capsys):
    from gpud.cli import gpudctl as cli

    config = tmp_path / "config.toml"
    config.write_text(V1_CONFIG)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["toolkit", "configure", "--config", str(config)]) == 1
    assert "run as root" in capsys.readouterr().err
    assert config.read_text() == V1_CONFIG


def test_a_layout_gpud_cannot_edit_is_refused_not_mangled():
    """Dotted runtime keys spread over a table: the re-parse check refuses instead of guessing."""
    config = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  runtimes.runc.runtime_type = "io.containerd.runc.v2"
  runtimes.runc.options.SystemdCgroup = true
"""
    with pytest.raises(ConfigError, match="cannot edit this file's layout safely"):
        configure(config)


def test_inline_tables_are_edited():
    config = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
  runc = { runtime_type = "io.containerd.runc.v2", options = { SystemdCgroup = true } }
"""
    edit = configure(config)
    assert runtimes_of(edit.text)["nvidia"]["options"] == {
        "SystemdCgroup": True,
        "BinaryName": BINARY,
    }
    assert not configure(edit.text).changed
