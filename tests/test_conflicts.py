"""Another program named gpud (Lepton AI's GPUd) on the node: found, explained, and refused.

Fake roots stand in for nodes. Lepton's files are written as its installer leaves them (its unit,
as embedded in github.com/leptonai/gpud pkg/gpud-manager/systemd/gpud.service, runs
``/usr/local/bin/gpud run $FLAGS``; older releases ran ``/usr/sbin/gpud``). The module runs as
the package's postinst runs it, as a subprocess, and doctor shows the same finding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.host.conflicts import (
    UNIT,
    exec_start_executables,
    find_conflicts,
    fix_steps,
    resolve_in_root,
)
from gpud.host.doctor import diagnose
from tests.support.fakehost import write
from tests.test_doctor import daemon, driver, fresh_node, gpudctl, platform, toolkit

LEPTON_BIN = "/usr/local/bin/gpud"


def lepton_unit(executable: str = LEPTON_BIN) -> str:
    """Lepton's unit, abridged to the lines that matter here."""
    return (
        "[Unit]\n"
        "Description=gpud\n"
        "After=network-pre.target NetworkManager.service systemd-resolved.service\n"
        "\n"
        "[Service]\n"
        "Slice=runtime.slice\n"
        "EnvironmentFile=/etc/default/gpud\n"
        f"ExecStart={executable} run $FLAGS\n"
        "StandardOutput=append:/var/log/gpud.log\n"
        "Type=notify\n"
        "Restart=always\n"
        "KillMode=control-group\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def our_unit(exec_start: str = "ExecStart=/usr/bin/gpud run") -> str:
    return (
        "[Unit]\nDescription=gpud GPU node agent\n\n"
        f"[Service]\nType=notify\n{exec_start}\nExecReload=/bin/kill -HUP $MAINPID\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def node(root: Path) -> Path:
    """What the gpud package leaves: the wrapper in /usr/bin and the unit in /usr/lib."""
    write(root, "/usr/bin/gpud", '#!/bin/sh\nexec /usr/lib/gpud/venv/bin/python -m gpud "$@"\n')
    write(root, "/usr/lib/systemd/system/gpud.service", our_unit())
    return root


def lepton(root: Path, binary: str = LEPTON_BIN) -> Path:
    write(root, UNIT, lepton_unit(binary))
    write(root, "/etc/default/gpud", 'FLAGS="--log-level=info --log-file=/var/log/gpud.log"\n')
    path = root / binary.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(64))
    return root


def link(root: Path, path: str, target: str) -> None:
    at = root / path.lstrip("/")
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


# --- what is a conflict -------------------------------------------------------------------------


def test_lepton_unit_and_binary_conflict_with_steps_in_a_runnable_order(tmp_path: Path) -> None:
    root = lepton(node(tmp_path))
    conflicts = find_conflicts(root)
    assert [c.path for c in conflicts] == [UNIT, LEPTON_BIN]
    unit, binary = conflicts
    assert "runs /usr/local/bin/gpud, not /usr/bin/gpud" in unit.why
    assert "replaces the gpud package's gpud.service" in unit.why
    assert "before /usr/bin/gpud on PATH" in binary.why
    # stopped and disabled while its unit file still exists, reloaded once it is gone
    assert fix_steps(conflicts) == (
        "sudo systemctl disable --now gpud.service",
        f"sudo rm {UNIT}",
        "sudo systemctl daemon-reload",
        f"sudo rm {LEPTON_BIN}",
    )


def test_older_lepton_in_usr_sbin(tmp_path: Path) -> None:
    root = lepton(node(tmp_path), "/usr/sbin/gpud")
    conflicts = find_conflicts(root)
    assert [c.path for c in conflicts] == [UNIT, "/usr/sbin/gpud"]
    assert "runs /usr/sbin/gpud" in conflicts[0].why


def test_a_bare_node_and_our_package_alone_have_no_conflict(tmp_path: Path) -> None:
    assert find_conflicts(tmp_path) == ()
    assert find_conflicts(node(tmp_path)) == ()


def test_the_binary_alone_conflicts_after_the_unit_is_gone(tmp_path: Path) -> None:
    root = lepton(node(tmp_path))
    (root / UNIT.lstrip("/")).unlink()
    conflicts = find_conflicts(root)
    assert [c.path for c in conflicts] == [LEPTON_BIN]
    assert fix_steps(conflicts) == (f"sudo rm {LEPTON_BIN}",)


def test_an_operators_copy_of_our_unit_in_etc_is_not_a_conflict(tmp_path: Path) -> None:
    root = node(tmp_path)
    write(root, UNIT, our_unit().replace("Type=notify", "Type=notify\nNice=-5"))
    assert find_conflicts(root) == ()


@pytest.mark.parametrize(
    ("exec_start", "conflict"),
    [
        ("ExecStart=-/usr/bin/gpud run", False),
        ("ExecStart=@/usr/bin/gpud gpud run", False),
        ("ExecStart=!!/usr/bin/gpud run --log-level debug", False),
        ("ExecStart = /usr/bin/gpud run", False),
        ('ExecStart="/usr/bin/gpud" run', False),
        ("ExecStart=gpud run", False),  # systemd's search path finds /usr/bin/gpud
        ("ExecStart=/bin/gpud run", False),  # /bin is usr-merged below
        ("ExecStart=/usr/local/bin/gpud run\nExecStart=\nExecStart=/usr/bin/gpud run", False),
        ("ExecStart=+/usr/local/bin/gpud run", True),
        ("ExecStart=/usr/local/bin/gpud \\\n    run $FLAGS", True),
        ("ExecStart=/usr/bin/gpud run\nExecStart=/usr/local/bin/gpud run", True),
        ("ExecStart=/usr/bin/gpud run\nExecStart=", True),  # reset to nothing
        ("#ExecStart=/usr/bin/gpud run", True),
        ("ExecStart=/opt/gpud/bin/gpud run", True),
    ],
)
def test_exec_start_forms(tmp_path: Path, exec_start: str, conflict: bool) -> None:
    root = node(tmp_path)
    link(root, "/bin", "usr/bin")
    write(root, UNIT, our_unit(exec_start))
    found = find_conflicts(root)
    assert bool(found) is conflict, found
    if conflict:
        assert found[0].path == UNIT


def test_no_exec_start_says_so() -> None:
    assert exec_start_executables("[Service]\nType=notify\n") == ()
    assert exec_start_executables("[Unit]\nExecStart=/usr/local/bin/gpud\n") == ()


def test_a_unit_without_exec_start_shadows_ours(tmp_path: Path) -> None:
    root = node(tmp_path)
    write(root, UNIT, "[Unit]\nDescription=placeholder\n")
    (found,) = find_conflicts(root)
    assert "has no ExecStart=" in found.why


def test_masked_and_linked_units_are_not_conflicts(tmp_path: Path) -> None:
    root = node(tmp_path)
    link(root, UNIT, "/dev/null")  # systemctl mask gpud: the operator's decision
    assert find_conflicts(root) == ()
    (root / UNIT.lstrip("/")).unlink()
    link(root, UNIT, "/usr/lib/systemd/system/gpud.service")  # inside the root, not the host's
    assert find_conflicts(root) == ()


@pytest.mark.parametrize(
    "target",
    [
        "/usr/bin/gpud",
        "../../bin/gpud",
        # more .. than the fake root is deep: a chroot stops at its root, so must we
        "../../../../../../../../../../../../usr/bin/gpud",
    ],
)
def test_a_symlink_to_our_binary_is_not_a_conflict(tmp_path: Path, target: str) -> None:
    root = node(tmp_path)
    link(root, LEPTON_BIN, target)
    assert find_conflicts(root) == ()


def test_links_are_followed_inside_the_root_only(tmp_path: Path) -> None:
    root = node(tmp_path / "root")
    outside = tmp_path / "host" / "usr" / "bin" / "gpud"
    outside.parent.mkdir(parents=True)
    outside.write_text("#!/bin/sh\n", encoding="utf-8")
    # read in the root, this absolute target is /<tmp>/host/usr/bin/gpud there: not ours
    link(root, LEPTON_BIN, str(outside))
    assert resolve_in_root(root, LEPTON_BIN) == Path(str(outside))
    assert [c.path for c in find_conflicts(root)] == [LEPTON_BIN]


def test_dangling_and_looping_links_elsewhere_conflict(tmp_path: Path) -> None:
    root = node(tmp_path)
    link(root, LEPTON_BIN, "/opt/lepton/gpud")
    link(root, "/usr/sbin/gpud", "gpud2")
    link(root, "/usr/sbin/gpud2", "gpud")
    assert resolve_in_root(root, "/usr/sbin/gpud") is None
    assert [c.path for c in find_conflicts(root)] == [LEPTON_BIN, "/usr/sbin/gpud"]


# --- the postinst's command ---------------------------------------------------------------------


def conflicts_cmd(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud.host.conflicts", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_module_fails_configuration_and_says_what_to_run(tmp_path: Path) -> None:
    root = lepton(node(tmp_path))
    out = conflicts_cmd("--root", str(root))
    assert out.returncode == 1
    assert out.stdout == ""
    err = out.stderr
    assert "Lepton AI's GPUd" in err
    assert f"{UNIT}: its ExecStart runs /usr/local/bin/gpud" in err
    assert "gpud was installed but not started" in err
    lines = [line.strip() for line in err.splitlines()]
    steps = [
        "sudo systemctl disable --now gpud.service",
        f"sudo rm {UNIT}",
        "sudo systemctl daemon-reload",
        f"sudo rm {LEPTON_BIN}",
        "sudo dpkg --configure -a",
    ]
    at = [lines.index(step) for step in steps]
    assert at == sorted(at), err


def test_module_is_silent_without_a_conflict(tmp_path: Path) -> None:
    root = node(tmp_path)
    write(root, UNIT, our_unit())
    out = conflicts_cmd("--root", str(root))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_module_reads_gpud_root_and_refuses_a_missing_root(tmp_path: Path) -> None:
    root = lepton(node(tmp_path / "root"))
    assert conflicts_cmd(env={"GPUD_ROOT": str(root)}).returncode == 1
    missing = conflicts_cmd("--root", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "not a directory" in missing.stderr


# --- gpudctl doctor ----------------------------------------------------------------------------


def test_doctor_fails_the_other_gpud_line_and_does_not_say_start_gpud(tmp_path: Path) -> None:
    conflicts = find_conflicts(lepton(node(tmp_path)))
    report = diagnose(platform(), driver(), toolkit(), None, "no socket", conflicts=conflicts)
    checks = {(c.area, c.name): c for c in report.checks}
    other = checks[("daemon", "other gpud")]
    assert other.ok is False
    assert UNIT in other.detail and LEPTON_BIN in other.detail
    assert other.fix.startswith("sudo systemctl disable --now gpud.service; sudo rm ")
    assert other.fix.index("daemon-reload") < other.fix.index("sudo dpkg --configure -a")
    assert other.fix.endswith("sudo systemctl enable --now gpud")
    # systemctl start gpud would start the other daemon
    assert "systemctl start gpud" not in checks[("daemon", "reachable")].fix
    assert not report.ok


def test_doctor_ok_line_without_a_conflict() -> None:
    report = diagnose(platform(), driver(), toolkit(), daemon(), None)
    other = next(c for c in report.checks if c.name == "other gpud")
    assert (other.area, other.ok) == ("daemon", True)
    assert report.ok


def test_gpudctl_doctor_on_a_node_with_lepton(tmp_path: Path) -> None:
    root, tools = fresh_node(tmp_path)
    lepton(node(root))
    out = gpudctl(root, tools, tmp_path / "gpud.sock")
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "other gpud" in line)
    assert lines[at].startswith("FAIL") and UNIT in lines[at]
    assert lines[at + 1].strip().startswith("fix: sudo systemctl disable --now gpud.service")
    data = json.loads(gpudctl(root, tools, tmp_path / "gpud.sock", "-o", "json").stdout)
    other = next(c for c in data["checks"] if c["name"] == "other gpud")
    assert other["ok"] is False and f"sudo rm {LEPTON_BIN}" in other["fix"]


def test_gpudctl_doctor_on_a_clean_node_says_ok(tmp_path: Path) -> None:
    root, tools = fresh_node(tmp_path)
    out = gpudctl(root, tools, tmp_path / "gpud.sock")
    line = next(line for line in out.stdout.splitlines() if "other gpud" in line)
    assert line.startswith("OK")
