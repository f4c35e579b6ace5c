"""``gpud bootstrap`` on a fake fresh Ubuntu 24.04 MicroK8s node, through the reboot and again.

The fake tools share a state directory, so the node changes as a real one would:
``ubuntu-drivers install`` and ``apt-get install`` change what ``dpkg-query`` answers,
``apt-get install nvidia-container-toolkit`` makes ``nvidia-ctk`` appear, ``systemctl enable
--now gpud.service`` makes gpud enabled and active, and ``systemctl reboot`` only marks that it
was asked: the test "reboots" by changing the boot ID and making the loaded module appear.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from gpud.cli.gpud_main import main
from gpud.config.load import load as load_config
from gpud.host.bootstrap import (
    ALREADY,
    AWAITING_REBOOT,
    DONE,
    RESUME_MARKER,
    STATE_FILE,
    Context,
    StepResult,
    resume_decision,
    step_service,
)
from gpud.host.commands import run_command
from tests.support.fakehost import GOLDEN, FakeTools, golden, mkdir, write

KERNEL = "6.8.0-45-generic"
TEMPLATE = "/var/snap/microk8s/current/args/containerd-template.toml"
FIXTURE = Path("/work/shared/fixtures/microk8s-containerd-template.toml")
UNITS = Path(__file__).resolve().parent.parent / "systemd"
RESUME_UNIT = "/usr/lib/systemd/system/gpud-bootstrap-resume.service"
MINIMAL_TEMPLATE = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""


def is_mutating(call: list[str]) -> bool:
    """Commands that change the node (every read-only query the steps make is left out)."""
    name, args = call[0], call[1:]
    if name == "ubuntu-drivers":
        return args[:1] == ["install"]
    if name == "apt-get":
        return True
    if name == "systemctl":
        return args[:1] not in (["is-active"], ["is-enabled"])
    if name == "snap":
        return args[:1] == ["restart"]
    return name == "nvidia-ctk"


class Node:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tmp / "root"
        self.state = tmp / "state"
        self.state.mkdir()
        r = self.root
        write(r, "/etc/os-release", golden("os-release-ubuntu-24.04"))
        write(r, "/proc/sys/kernel/osrelease", KERNEL + "\n")
        write(r, "/proc/sys/kernel/random/boot_id", "11111111-aaaa-4bbb-8ccc-000000000001\n")
        mkdir(r, "/etc/modprobe.d")
        mkdir(r, "/snap/microk8s/current")
        template = FIXTURE.read_text() if FIXTURE.exists() else MINIMAL_TEMPLATE
        write(r, TEMPLATE, template)
        # The package's units, as installed.
        for unit in ("gpud.service", "gpud-bootstrap-resume.service"):
            write(r, f"/usr/lib/systemd/system/{unit}", (UNITS / unit).read_text())
        self.config = write(tmp, "/gpud.yaml", "version: v1\nmig:\n  layout: all-1g.10gb\n")
        self.tools = FakeTools(tmp / "tools")
        self._fakes()
        self.dpkg("dpkg-none", "dpkg")
        self.dpkg("dpkg-550-server-no-utils", "after-ud")
        self.dpkg("dpkg-550-server-signed", "after-apt")
        shutil.copy(GOLDEN / "ubuntu-drivers-list-gpgpu-noble-h100.out", self.state / "list.out")
        monkeypatch.setenv("PATH", self.tools.path)
        monkeypatch.setenv("GPUD_ROOT", str(self.root))
        monkeypatch.setattr(os, "geteuid", lambda: 0)

    def _fakes(self) -> None:
        s = shlex.quote(str(self.state))
        t = self.tools
        t.add_script(
            "dpkg-query",
            'for last in "$@"; do :; done\n'
            'if [ "$last" = nvidia-container-toolkit ]; then\n'
            f"  if [ -f {s}/toolkit ]; then printf '1.17.8-1 ii \\n'; exit 0; fi\n"
            "  echo 'dpkg-query: no packages found matching nvidia-container-toolkit' >&2;"
            " exit 1\nfi\n"
            f"/bin/cat {s}/dpkg.out; /bin/cat {s}/dpkg.err >&2; exit 1",
        )
        t.add_script(
            "ubuntu-drivers",
            'case "$1" in\n'
            f"  list) /bin/cat {s}/list.out ;;\n"
            f"  install) /bin/cp {s}/after-ud.out {s}/dpkg.out; /bin/cp {s}/after-ud.err"
            f" {s}/dpkg.err ;;\nesac\nexit 0",
        )
        t.add_script(
            "apt-get",
            f"if [ -f {s}/apt-fail ]; then"
            " echo 'E: Could not get lock /var/lib/dpkg/lock-frontend' >&2; exit 100; fi\n"
            'for last in "$@"; do :; done\n'
            'case "$last" in\n'
            f"  nvidia-container-toolkit) : > {s}/toolkit ;;\n"
            f"  nvidia-utils-*) /bin/cp {s}/after-apt.out {s}/dpkg.out;"
            f" /bin/cp {s}/after-apt.err {s}/dpkg.err ;;\nesac\nexit 0",
        )
        t.add_golden("apt-cache", "apt-cache-policy-toolkit")
        t.add_golden("mokutil", "mokutil-disabled")
        t.add_script(
            "systemctl",
            'case "$1 $2" in\n'
            f"  'is-active gpud.service') [ -f {s}/gpud-active ] && {{ echo active; exit 0; }};"
            " echo inactive; exit 3 ;;\n"
            f"  'is-enabled gpud.service') [ -f {s}/gpud-enabled ] && {{ echo enabled; exit 0; }};"
            " echo disabled; exit 1 ;;\n"
            "  'is-active snap.microk8s.daemon-containerd') echo active ;;\n"
            "  is-active*) echo inactive; exit 3 ;;\n"
            f"  'enable --now') : > {s}/gpud-enabled; : > {s}/gpud-active ;;\n"
            f"  reboot*) : > {s}/reboot-requested ;;\n"
            "esac\nexit 0",
        )
        t.add("snap")
        spec = shlex.quote(str(GOLDEN / "cdi-nvidia-2gpu.yaml"))
        t.add_script(
            "nvidia-ctk",
            f"[ -f {s}/toolkit ] || exit 127\n"
            'for a in "$@"; do case "$a" in --output=*) out="${a#--output=}";; esac; done\n'
            f'/bin/cat {spec} > "$out"',
        )

    def dpkg(self, stem: str, when: str) -> None:
        for ext in ("out", "err"):
            src = GOLDEN / f"{stem}.{ext}"
            text = src.read_text(encoding="utf-8") if src.exists() else ""
            (self.state / f"{when}.{ext}").write_text(text, encoding="utf-8")

    def reboot(self) -> None:
        """What a reboot changes on the fake node: a new boot ID and the module loaded."""
        write(
            self.root, "/proc/sys/kernel/random/boot_id", "22222222-aaaa-4bbb-8ccc-000000000002\n"
        )
        write(
            self.root, "/proc/driver/nvidia/version", golden("proc-driver-nvidia-version-550-open")
        )
        mkdir(self.root, "/sys/module/nvidia")
        (self.state / "reboot-requested").unlink(missing_ok=True)

    def bootstrap(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
        self.tools.log.unlink(missing_ok=True)
        rc = main(["bootstrap", "--config", str(self.config), "-o", "json", *args])
        out = capsys.readouterr()
        return rc, json.loads(out.out), out.err

    def mutating(self) -> list[list[str]]:
        return [c for c in self.tools.calls() if is_mutating(c)]

    def state_file(self) -> dict:
        return json.loads((self.root / STATE_FILE.lstrip("/")).read_text(encoding="utf-8"))

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    return Node(tmp_path, monkeypatch)


def statuses(d: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in d["steps"]}


def test_fresh_node_through_reboot_then_no_op(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    template_before = node.path(TEMPLATE).read_text()

    # 1. fresh node: driver installed, reboot requested, nothing else run
    rc, d, err = node.bootstrap(capsys)
    assert rc == 0, err
    assert d["phase"] == AWAITING_REBOOT and d["ok"] is True
    assert statuses(d) == {"driver": "reboot", "reboot": "reboot"}
    assert "[1/7] driver:" in err and "[2/7] reboot:" in err
    assert node.mutating() == [
        ["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"],
        ["apt-get", "install", "-y", "nvidia-utils-550-server"],
        ["systemctl", "enable", "gpud-bootstrap-resume.service"],
        ["systemctl", "reboot"],
    ]
    unit = node.path(RESUME_UNIT).read_text()
    assert "ExecStart=/usr/bin/gpud bootstrap --resume" in unit
    assert f"ConditionPathExists={RESUME_MARKER}" in unit
    assert "After=network-online.target" in unit and "WantedBy=multi-user.target" in unit
    assert node.path(RESUME_MARKER).exists()
    state = node.state_file()
    assert state["phase"] == AWAITING_REBOOT
    assert state["boot_id"] == "11111111-aaaa-4bbb-8ccc-000000000001"
    assert set(state["steps"]) == {"driver", "reboot"}
    assert node.path(TEMPLATE).read_text() == template_before

    # 2. --resume in the same boot: refused, nothing run
    rc, d, err = node.bootstrap(capsys, "--resume")
    assert rc == 1
    assert "has not rebooted" in d["message"] and "fix:" in err
    assert node.mutating() == []
    assert node.path(RESUME_MARKER).exists()

    # 3. after the reboot, the unit's --resume finishes the job in order and disables itself
    node.reboot()
    rc, d, err = node.bootstrap(capsys, "--resume")
    assert rc == 0, err
    assert d["phase"] == "done"
    assert list(statuses(d)) == ["driver", "reboot", "toolkit", "runtime", "cdi", "mig", "service"]
    assert statuses(d) == {
        "driver": "already",
        "reboot": "already",
        "toolkit": "done",
        "runtime": "done",
        "cdi": "done",
        "mig": "done",
        "service": "done",
    }
    assert "[3/7] toolkit: installed nvidia-container-toolkit" in err
    assert "[6/7] mig: gpud applies all-1g.10gb at start" in err
    mutating = node.mutating()
    assert mutating[:2] == [
        ["systemctl", "disable", "gpud-bootstrap-resume.service"],
        ["apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confold",
         "nvidia-container-toolkit"],
    ]  # fmt: skip
    assert mutating[2:] == [
        ["snap", "restart", "microk8s.daemon-containerd"],
        ["nvidia-ctk", "cdi", "generate", f"--output={node.path('/var/run/cdi/nvidia.yaml')}",
         "--format=yaml"],
        ["systemctl", "enable", "--now", "gpud.service"],
    ]  # fmt: skip
    assert not node.path(RESUME_MARKER).exists()
    edited = node.path(TEMPLATE).read_text()
    assert edited != template_before and 'default_runtime_name = "nvidia"' in edited
    assert list(node.path(TEMPLATE).parent.glob("containerd-template.toml.gpud-backup-*"))
    assert node.state_file()["phase"] == "done"

    # 4. the unit again (it would not start: no marker) or by hand: nothing to resume
    rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 0 and d["steps"] == [] and "nothing to resume" in d["message"]
    assert node.tools.calls() == []

    # 5. a second plain run on the ready node: every step already, nothing changed
    rc, d, err = node.bootstrap(capsys)
    assert rc == 0, err
    assert set(statuses(d).values()) == {"already"}
    assert "[3/7] toolkit: already installed (1.17.8-1)" in err
    assert node.mutating() == []
    assert node.path(TEMPLATE).read_text() == edited
    assert node.state_file()["phase"] == "done"


def test_plain_run_after_reboot_disarms_the_resume_unit(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node.bootstrap(capsys)[0] == 0
    node.reboot()
    node.mutating()
    rc, d, err = node.bootstrap(capsys)
    assert rc == 0, err
    assert d["phase"] == "done"
    assert ["systemctl", "disable", "gpud-bootstrap-resume.service"] in node.mutating()
    assert not node.path(RESUME_MARKER).exists()
    rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 0 and "nothing to resume" in d["message"]


def test_apt_failure_stops_at_driver_with_fix(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    (node.state / "apt-fail").write_text("")
    rc, d, err = node.bootstrap(capsys)
    assert rc == 1
    assert d["phase"] == "failed" and d["failed_step"] == "driver"
    assert "dpkg lock" in d["fix"]
    assert "bootstrap failed at step driver" in err and "fix:" in err
    assert list(statuses(d)) == ["driver"]
    assert not any(c[0] == "systemctl" and c[1] == "reboot" for c in node.tools.calls())
    state = node.state_file()
    assert state["phase"] == "failed" and state["failed_step"] == "driver"
    assert set(state["steps"]) == {"driver"}


def test_invalid_template_fails_at_runtime_untouched(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.bootstrap(capsys)
    node.reboot()
    bad = "version = 2\n[plugins\n"
    node.path(TEMPLATE).write_text(bad)
    rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 1
    assert d["failed_step"] == "runtime"
    assert list(statuses(d)) == ["driver", "reboot", "toolkit", "runtime"]
    assert "left untouched" in d["steps"][-1]["detail"]
    assert node.path(TEMPLATE).read_text() == bad
    assert not any(c[0] in ("snap", "nvidia-ctk") for c in node.tools.calls())
    assert node.state_file()["phase"] == "failed"


def test_missing_gpud_unit_fails_service_step(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.reboot()  # driver already loaded: no reboot in this run
    node.dpkg("dpkg-550-server-signed", "dpkg")
    node.path("/usr/lib/systemd/system/gpud.service").unlink()
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 1
    assert d["failed_step"] == "service" and d["fix"] == "install the gpud package"
    assert statuses(d)["cdi"] == "done"


def test_missing_resume_unit_fails_before_rebooting(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.path(RESUME_UNIT).unlink()
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 1
    assert d["failed_step"] == "reboot" and "install the gpud package" in d["fix"]
    assert ["systemctl", "reboot"] not in node.mutating()
    assert not node.path(RESUME_MARKER).exists()


def test_unknown_mig_layout_fails_before_service(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.reboot()
    node.dpkg("dpkg-550-server-signed", "dpkg")
    node.config.write_text("version: v1\nmig:\n  layout: all-9g.99gb\n")
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 1 and d["failed_step"] == "mig"
    assert "service" not in statuses(d)


def test_not_root_exits_1(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["bootstrap"]) == 1
    assert "root" in capsys.readouterr().err
    assert node.tools.calls() == []


def test_resume_decision() -> None:
    armed = {"phase": AWAITING_REBOOT, "boot_id": "a"}
    assert resume_decision(armed, True, "b")[0] == "proceed"
    assert resume_decision(armed, True, "a")[0] == "refuse"
    assert resume_decision(armed, False, "b")[0] == "nothing"
    assert resume_decision({"phase": "done"}, True, "b")[0] == "nothing"
    assert resume_decision({}, False, None)[0] == "nothing"


def test_another_gpud_fails_service_step_with_its_removal(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.reboot()
    node.dpkg("dpkg-550-server-signed", "dpkg")
    write(
        node.root,
        "/etc/systemd/system/gpud.service",
        "[Service]\nExecStart=/usr/local/bin/gpud run $FLAGS\n",
    )
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 1 and d["failed_step"] == "service"
    assert "/etc/systemd/system/gpud.service" in d["steps"][-1]["detail"]
    assert "daemon-reload" in d["fix"]
    assert ["systemctl", "enable", "--now", "gpud.service"] not in node.mutating()


def test_gpud_running_before_the_driver_is_restarted_on_it(node: Node) -> None:
    """The package started gpud before bootstrap installed a driver that needed no reboot."""
    (node.state / "gpud-enabled").touch()
    (node.state / "gpud-active").touch()
    ctx = Context(node.root, load_config(node.config), run_command, {})
    ctx.results["driver"] = StepResult("driver", DONE, "installed 550-server")
    result = step_service(ctx)
    assert (result.status, result.detail) == ("done", "restarted gpud.service on the new driver")
    assert node.mutating() == [["systemctl", "restart", "gpud.service"]]
    node.tools.log.unlink()
    ctx.results["driver"] = StepResult("driver", ALREADY, "550-server loaded")
    assert step_service(ctx).status == ALREADY
    assert node.mutating() == []
