"""gpud.service's device groups, resolved again by systemd once the driver has registered them.

The decisions (which unit gpud is, which entries name device groups) are checked on the texts
systemd gives; the shell runs the real ``systemctl`` command line against a stand-in ``systemctl``
first on ``PATH`` (no systemd runs here), which records what it was asked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpud.daemon.device_policy import APPLIED, FAILED, SKIPPED, group_entries, own_unit, reapply
from gpud.host.commands import run_command


@pytest.mark.parametrize(
    ("cgroup", "invocation", "unit"),
    [
        ("0::/system.slice/gpud.service\n", "6f3c0c1e", "gpud.service"),
        ("0::/system.slice/gpud-canary.service\n", "6f3c0c1e", "gpud-canary.service"),
        # cgroup v1 (hybrid): the name=systemd hierarchy says where systemd put the process.
        (
            "12:devices:/system.slice/gpud.service\n1:name=systemd:/system.slice/gpud.service\n",
            "6f3c0c1e",
            "gpud.service",
        ),
        # systemd 252 in a unified container on a hybrid host (systemd-nspawn here): the v1
        # name=systemd line shows the host's view.
        (
            "9:name=systemd:/\n5:devices:/\n1:cpu:/\n0::/system.slice/gpud.service\n",
            "aa54bf68",
            "gpud.service",
        ),
        ("0::/system.slice/gpud.service\n", None, None),  # no INVOCATION_ID: not started by it
        ("0::/user.slice/user-0.slice/session-3.scope\n", "6f3c0c1e", None),  # a shell
        ("0::/\n", "6f3c0c1e", None),  # a container's root cgroup
    ],
)
def test_own_unit(cgroup: str, invocation: str | None, unit: str | None) -> None:
    assert own_unit(cgroup, invocation) == unit


def test_group_entries_are_the_ones_systemd_resolves_through_proc_devices() -> None:
    show = (
        "DeviceAllow=char-nvidia* rwm\n"
        "DeviceAllow=/dev/nvidia-fs rw\n"
        "DeviceAllow=block-loop r\n"
        "DeviceAllow=char-195 rwm\n"
    )
    assert group_entries(show) == ("char-nvidia* rwm", "block-loop r", "char-195 rwm")
    assert group_entries("DeviceAllow=\n") == ()
    assert group_entries("") == ()


SHIPPED = "DeviceAllow=char-nvidia* rwm\n"


def _systemctl(tmp_path: Path, show: str, set_exit: int = 0) -> Path:
    """A stand-in ``systemctl`` on ``PATH`` answering ``show`` and ``set-property``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    (tmp_path / "show.out").write_text(show)
    script = bin_dir / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {log}\n'
        'case "$1" in\n'
        f"  show) cat {tmp_path / 'show.out'} ;;\n"
        f"  set-property) [ {set_exit} -eq 0 ] || echo 'Access denied' >&2; exit {set_exit} ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


@pytest.fixture
def path_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return tmp_path


def test_the_shipped_entries_are_set_again_at_runtime_only(path_first: Path) -> None:
    log = _systemctl(path_first, SHIPPED)
    result = reapply("gpud.service", run_command)
    assert result.status == APPLIED, result.message
    assert log.read_text().splitlines() == [
        "show --property=DeviceAllow gpud.service",
        "set-property --runtime gpud.service DeviceAllow=char-nvidia* rwm",
    ]


def test_a_unit_whose_drop_in_removed_the_allow_list_is_left_alone(path_first: Path) -> None:
    log = _systemctl(path_first, "")
    result = reapply("gpud.service", run_command)
    assert result.status == SKIPPED
    assert log.read_text().splitlines() == ["show --property=DeviceAllow gpud.service"]


def test_a_refused_refresh_says_what_to_do(path_first: Path) -> None:
    _systemctl(path_first, SHIPPED, set_exit=1)
    result = reapply("gpud.service", run_command)
    assert result.status == FAILED
    assert "Access denied" in result.message and "systemctl restart gpud" in result.message


def test_no_systemctl_is_a_failure_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = reapply("gpud.service", run_command)
    assert result.status == FAILED
    assert "systemctl" in result.message
