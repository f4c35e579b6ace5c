"""The config file: strict, versioned, every problem reported with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.cli.gpud_main import main as gpud_main
from gpud.cli.gpudctl import main as gpudctl_main
from gpud.config import kubelet
from gpud.config.load import ConfigError, load, parse
from gpud.config.models import DEFAULT_IGNORED_XIDS, BackendKind, DeviceListStrategy
from gpud.daemon.settings import Overrides, resolve
from gpud.health import XidPolicy


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as err:
        parse(text, "gpud.yaml")
    return err.value.problems


def test_minimal_file_gives_documented_defaults() -> None:
    cfg = parse("version: v1\n")
    assert cfg.backend is BackendKind.AUTO
    assert cfg.paths.state_dir == Path("/var/lib/gpud")
    assert cfg.paths.socket == Path("/run/gpud/gpud.sock")
    assert cfg.paths.kubelet_dir is None  # detected
    assert cfg.device_plugin.device_list_strategy == [DeviceListStrategy.ENVVAR]
    assert tuple(cfg.health.ignored_xids) == DEFAULT_IGNORED_XIDS == (13, 31, 43, 45, 68, 109)


def test_every_path_can_be_overridden() -> None:
    cfg = parse(
        "version: v1\npaths:\n  stateDir: /srv/gpud\n  socket: /tmp/g.sock\n"
        "  kubeletDir: /k/device-plugins\n  podResourcesSocket: /k/pr.sock\n  socketGroup: ops\n"
    )
    assert cfg.paths.state_dir == Path("/srv/gpud")
    assert cfg.paths.socket == Path("/tmp/g.sock")
    assert cfg.paths.kubelet_dir == Path("/k/device-plugins")
    assert cfg.paths.pod_resources_socket == Path("/k/pr.sock")
    assert cfg.paths.socket_group == "ops"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "version: required"),
        ("version: v2\n", "version: Input should be 'v1'"),
        ("version: v1\nbakend: sim\n", "bakend: Extra inputs are not permitted"),
        ("version: v1\npaths:\n  sokcet: /x\n", "paths.sokcet: Extra inputs are not permitted"),
        ("version: v1\nhealth:\n  ignoredXids: [13, -4]\n", "health.ignoredXids: Value error"),
        ("version: v1\nhealth:\n  ignoredXids: [x]\n", "health.ignoredXids[0]:"),
        ("version: v1\ndevicePlugin:\n  cdiKind: gpu\n", "devicePlugin.cdiKind: Value error"),
        ("version: v1\nbackend: cuda\n", "backend: Input should be 'auto', 'nvml' or 'sim'"),
        ("version: [v1\n", "not valid YAML"),
        ("- version: v1\n", "expected a mapping"),
    ],
)
def test_bad_files_name_the_key(text: str, expected: str) -> None:
    assert any(expected in p for p in problems(text)), problems(text)


def test_all_problems_at_once() -> None:
    found = problems("version: v1\nbakend: x\nhealth:\n  ignoredXids: [x]\n")
    assert len(found) == 2


def test_ignore_list_extends_and_forced_xids_win() -> None:
    cfg = parse("version: v1\nhealth:\n  extraIgnoredXids: [79]\n  criticalXids: [13]\n")
    policy = XidPolicy.from_config(cfg.health)
    assert not policy.is_critical(79)  # extended
    assert not policy.is_critical(31)  # default still in force
    assert policy.is_critical(13)  # forced back on
    assert policy.is_critical(48)


def test_a_missing_named_file_is_an_error_but_no_default_file_means_defaults(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")


def test_config_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: v1\nsimulate: dgx-a100\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: v1\npaths:\n  stateDir: [1]\nlog:\n  level: loud\n")
    assert gpud_main(["config", "validate", str(good)]) == 0
    assert gpudctl_main(["config", "validate", str(good)]) == 0
    capsys.readouterr()
    assert gpud_main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "paths.stateDir" in err and "log.level" in err
    assert gpudctl_main(["config", "validate", str(tmp_path / "missing.yaml")]) == 2


def test_command_line_wins_over_the_file(tmp_path: Path) -> None:
    file = tmp_path / "gpud.yaml"
    file.write_text(
        "version: v1\nbackend: nvml\npaths:\n  stateDir: /from/file\n  kubeletDir: /file/k\n"
    )
    settings = resolve(file, Overrides(simulate="t4x1", state_dir=tmp_path / "s"))
    assert settings.config.backend is BackendKind.SIM
    assert settings.config.simulate == "t4x1"
    assert settings.config.paths.state_dir == tmp_path / "s"
    assert settings.kubelet_dir == Path("/file/k")  # not overridden: the file's value
    # A reload reads the file again and re-applies the same flags.
    file.write_text("version: v1\npaths:\n  stateDir: /other\n")
    again = settings.reload()
    assert again.config.paths.state_dir == tmp_path / "s"
    assert again.config.simulate == "t4x1"


def test_kubelet_dir_detection(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    found = kubelet.detect(plain)
    assert found.flavour == "kubelet"
    assert found.device_plugin_dir == plain / "var/lib/kubelet/device-plugins"

    mk = tmp_path / "mk"
    (mk / "var/snap/microk8s/common/var/lib/kubelet").mkdir(parents=True)
    (mk / "var/lib").mkdir(parents=True)
    (mk / "var/lib/kubelet").symlink_to(mk / "var/snap/microk8s/common/var/lib/kubelet")
    found = kubelet.detect(mk)
    assert found.flavour == "microk8s"
    # kubelet hard-codes /var/lib/kubelet/device-plugins: the symlink leads to the snap's data.
    assert found.device_plugin_dir == mk / "var/lib/kubelet/device-plugins"
    assert found.pod_resources_socket == (
        mk / "var/snap/microk8s/common/var/lib/kubelet/pod-resources/kubelet.sock"
    )

    k3s = tmp_path / "k3s"
    (k3s / "var/lib/rancher/k3s/agent").mkdir(parents=True)
    found = kubelet.detect(k3s)
    assert found.flavour == "k3s"
    assert found.device_plugin_dir == k3s / "var/lib/rancher/k3s/agent/kubelet/device-plugins"
