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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpud.cli.gpud_main import main
from gpud.config.load import load as load_config
from gpud.host import bootstrap as bootstrap_module
from gpud.host.bootstrap import (
    ALREADY,
    AWAITING_MOK,
    AWAITING_REBOOT,
    DONE,
    LOCK_FILE,
    RESUME_MARKER,
    STATE_FILE,
    Context,
    StepResult,
    resume_decision,
    step_service,
)
from gpud.host.commands import run_command
from tests.conftest import unavailable
from tests.support.fakehost import GOLDEN, FakeTools, golden, mkdir, write
from tests.support.locks import HOLDER_NAME, LockHolder, real_apt_with_gpud_options

KERNEL = "6.8.0-45-generic"
LOCK_OPTION = ["-o", "DPkg::Lock::Timeout=600"]
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
        self.tmp = tmp
        self.tools = FakeTools(tmp / "tools")
        self.fake_tools()
        self.dpkg("dpkg-none", "dpkg")
        self.dpkg("dpkg-550-server-no-utils", "after-ud")
        self.dpkg("dpkg-550-server-signed", "after-apt")
        shutil.copy(GOLDEN / "ubuntu-drivers-list-gpgpu-noble-h100.out", self.state / "list.out")
        monkeypatch.setenv("PATH", self.tools.path)
        monkeypatch.setenv("GPUD_ROOT", str(self.root))
        monkeypatch.setattr(os, "geteuid", lambda: 0)

    def fake_tools(self, real_locks: bool = False, ud_seconds: float = 0) -> None:
        """``real_locks``: apt-get first takes dpkg's locks with the real apt-get, with gpud's
        options (apt's own wait); ``ud_seconds``: ubuntu-drivers install takes that long."""
        s = shlex.quote(str(self.state))
        t = self.tools
        apt_locks = real_apt_with_gpud_options(self.root) if real_locks else ""
        ud_sleep = f"/bin/sleep {ud_seconds}; " if ud_seconds else ""
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
            f"  install) {ud_sleep}/bin/cp {s}/after-ud.out {s}/dpkg.out; /bin/cp {s}/after-ud.err"
            f" {s}/dpkg.err ;;\nesac\nexit 0",
        )
        t.add_script(
            "apt-get",
            f"if [ -f {s}/apt-fail ]; then"
            " echo 'E: Could not get lock /var/lib/dpkg/lock-frontend' >&2; exit 100; fi\n"
            + apt_locks
            + 'for last in "$@"; do :; done\n'
            'case "$last" in\n'
            f"  nvidia-container-toolkit) : > {s}/toolkit ;;\n"
            f"  nvidia-utils-*) /bin/cp {s}/after-apt.out {s}/dpkg.out;"
            f" /bin/cp {s}/after-apt.err {s}/dpkg.err ;;\nesac\nexit 0",
        )
        t.add_golden("apt-cache", "apt-cache-policy-toolkit")
        t.add_script(
            "mokutil",
            f'case "$1" in --test-key) /bin/cat {s}/key.out;; *) /bin/cat {s}/sb.out;; esac',
        )
        self.secure_boot(False)
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

    def secure_boot(self, on: bool, key: str | None = None) -> None:
        """mokutil's answers: Secure Boot on or off, DKMS's certificate as --test-key says."""
        (self.state / "sb.out").write_text(golden(f"mokutil-{'enabled' if on else 'disabled'}.out"))
        (self.state / "key.out").write_text(golden(f"mokutil-test-key-{key}.out") if key else "")
        if key:
            write(self.root, "/var/lib/shim-signed/mok/MOK.der", "certificate")

    def configure(self, text: str) -> None:
        self.config.write_text("version: v1\nmig:\n  layout: all-1g.10gb\n" + text)

    def gpud_running(self) -> None:
        """gpud.service enabled and active, as the package leaves it."""
        (self.state / "gpud-enabled").touch()
        (self.state / "gpud-active").touch()

    def process(self, *args: str) -> subprocess.Popen[str]:
        """``gpud bootstrap`` as its own process (as root, as cloud-init and the unit run it)."""
        if os.getuid() != 0:
            unavailable("running gpud bootstrap as a process needs root")
        env = {**os.environ, "PATH": self.tools.path, "GPUD_ROOT": str(self.root)}
        return subprocess.Popen(
            [sys.executable, "-m", "gpud.cli.gpud_main", "bootstrap", "--config",
             str(self.config), "-o", "json", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, which a test may kill whole
        )  # fmt: skip

    def wait_for_step(self, step: str, timeout: float = 60.0) -> dict:
        """The state file once a running bootstrap has started ``step``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = self.state_file()
            except (OSError, ValueError):
                state = {}
            if state.get("phase") == "running" and state.get("step") == step:
                return state
            time.sleep(0.05)
        raise AssertionError(f"bootstrap did not reach step {step}")

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
        ["apt-get", "install", "-y", *LOCK_OPTION, "nvidia-utils-550-server"],
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
    # the unit is disarmed last, once the setup is done: a failure before that leaves it armed
    assert node.mutating() == [
        ["apt-get", "install", "-y", *LOCK_OPTION, "-o", "Dpkg::Options::=--force-confold",
         "nvidia-container-toolkit"],
        ["snap", "restart", "microk8s.daemon-containerd"],
        ["nvidia-ctk", "cdi", "generate", f"--output={node.path('/var/run/cdi/nvidia.yaml')}",
         "--format=yaml"],
        ["systemctl", "enable", "--now", "gpud.service"],
        ["systemctl", "disable", "gpud-bootstrap-resume.service"],
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
    assert resume_decision("a\n", armed, "b")[0] == "proceed"
    assert resume_decision("a\n", armed, "a")[0] == "refuse"
    assert resume_decision(None, armed, "b")[0] == "nothing"
    # the marker, not the phase, arms it: a failed resume stays armed for the next try
    assert resume_decision("a\n", {"phase": "failed"}, "b")[0] == "proceed"
    assert resume_decision("\n", armed, "a")[0] == "refuse"  # the state's boot ID, then
    assert resume_decision("", {}, None)[0] == "proceed"  # nothing proves it did not reboot
    assert "MOK" in resume_decision("a", {"phase": AWAITING_MOK}, "a")[1]


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


# --- the dpkg lock, and a resume that fails ------------------------------------------------------


def test_first_boot_waits_for_the_dpkg_lock_and_names_its_holder(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.fake_tools(real_locks=True)
    with LockHolder(node.path("/var/lib/dpkg/lock-frontend"), 2.0, scratch=node.tmp) as holder:
        rc, d, err = node.bootstrap(capsys)
    assert rc == 0, err
    assert d["phase"] == AWAITING_REBOOT
    assert (
        f"waiting for /var/lib/dpkg/lock-frontend, held by {HOLDER_NAME} (pid {holder.pid}) "
        "(up to 600 s)"
    ) in err


def test_a_lock_held_too_long_fails_the_driver_step_naming_its_holder(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.configure("apt:\n  lockTimeout: 1\n")
    with LockHolder(node.path("/var/lib/dpkg/lock"), scratch=node.tmp) as holder:
        rc, d, _ = node.bootstrap(capsys)
    who = f"{HOLDER_NAME} (pid {holder.pid})"
    assert rc == 1 and d["failed_step"] == "driver"
    assert f"/var/lib/dpkg/lock is still held by {who} after 1 s" in d["message"]
    assert f"wait for {who} to finish" in d["fix"] and "apt.lockTimeout" in d["fix"]
    assert node.mutating() == []
    assert not node.path(RESUME_MARKER).exists()


def test_resume_retries_a_failed_step_and_disarms_only_when_done(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the reboot unattended-upgrades holds the lock past apt.lockTimeout: the resume's
    toolkit step fails, the unit stays armed, and the next attempt (the holder done by then)
    finishes the setup."""
    assert node.bootstrap(capsys)[0] == 0
    node.reboot()
    node.configure("apt:\n  lockTimeout: 1\n")
    holder = LockHolder(node.path("/var/lib/dpkg/lock-frontend"), scratch=node.tmp)
    seen: list[dict] = []

    def pause(seconds: float) -> None:
        # between the attempts: still armed, nothing disabled; then the holder finishes
        seen.append(
            {
                "seconds": seconds,
                "marker": node.path(RESUME_MARKER).exists(),
                "disabled": ["systemctl", "disable", "gpud-bootstrap-resume.service"]
                in node.tools.calls(),
                "state": node.state_file(),
            }
        )
        holder.release()

    monkeypatch.setattr(bootstrap_module, "pause", pause)
    try:
        rc, d, err = node.bootstrap(capsys, "--resume")
    finally:
        holder.release()
    assert rc == 0, err
    assert d["phase"] == "done"
    assert len(seen) == 1 and seen[0]["seconds"] == 60.0
    assert seen[0]["marker"] is True and seen[0]["disabled"] is False
    first = seen[0]["state"]
    assert first["phase"] == "failed" and first["failed_step"] == "toolkit"
    assert first["resume_failures"] == 1
    assert f"held by {HOLDER_NAME} (pid {holder.pid})" in first["steps"]["toolkit"]["detail"]
    assert "attempt 1 of 3 failed at step toolkit; trying again in 60 s" in err
    assert not node.path(RESUME_MARKER).exists()
    assert node.mutating()[-1] == ["systemctl", "disable", "gpud-bootstrap-resume.service"]
    state = node.state_file()
    assert state["phase"] == "done" and "resume_failures" not in state


def test_a_resume_that_keeps_failing_stays_armed_then_gives_up(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.bootstrap(capsys)[0] == 0
    node.reboot()
    node.configure("apt:\n  lockTimeout: 0\n")
    monkeypatch.setattr(bootstrap_module, "pause", lambda seconds: None)
    disable = ["systemctl", "disable", "gpud-bootstrap-resume.service"]
    with LockHolder(node.path("/var/lib/dpkg/lock-frontend"), scratch=node.tmp):
        rc, d, err = node.bootstrap(capsys, "--resume")
        assert rc == 1 and d["failed_step"] == "toolkit"
        assert "stays armed and tries again at the next boot (3 of 5 attempts used)" in d["message"]
        assert err.count("failed at step toolkit; trying again") == 2
        assert node.path(RESUME_MARKER).exists() and disable not in node.mutating()
        assert node.state_file()["resume_failures"] == 3
        # the next boot: two more attempts, then the unit is disarmed
        write(node.root, "/proc/sys/kernel/random/boot_id", "33333333-aaaa-4bbb-8ccc-3\n")
        rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 1
    assert "gave up after 5 attempts: gpud-bootstrap-resume.service is disabled" in d["message"]
    assert not node.path(RESUME_MARKER).exists() and disable in node.mutating()
    rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 0 and "nothing to resume" in d["message"]


def test_a_failure_that_cannot_pass_by_itself_is_not_retried_in_the_same_boot(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.bootstrap(capsys)[0] == 0
    node.reboot()
    node.config.write_text("version: v1\nmig:\n  layout: all-9g.99gb\n")
    pauses: list[float] = []
    monkeypatch.setattr(bootstrap_module, "pause", pauses.append)
    rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 1 and d["failed_step"] == "mig" and pauses == []
    assert "(1 of 5 attempts used)" in d["message"] and node.path(RESUME_MARKER).exists()


# --- one bootstrap at a time ---------------------------------------------------------------------


def test_a_second_bootstrap_at_once_does_nothing_and_names_the_first(node: Node) -> None:
    """Two runs at once (the operator's beside cloud-init's): one installs and reboots, the
    other stops at the lock; neither ubuntu-drivers nor the reboot run twice."""
    node.fake_tools(ud_seconds=2)
    first = node.process()
    try:
        node.wait_for_step("driver")
        second = node.process()
        out, err = second.communicate(timeout=120)
    finally:
        first_out, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert json.loads(first_out)["phase"] == AWAITING_REBOOT
    assert second.returncode == 1
    assert "gpud: another gpud bootstrap is running: " in err
    assert f"(pid {first.pid}) holds {LOCK_FILE}; this one did nothing" in err
    assert json.loads(out)["busy_pid"] == first.pid
    calls = node.tools.calls()
    assert calls.count(["ubuntu-drivers", "install", "--gpgpu", "nvidia:550-server"]) == 1
    assert calls.count(["systemctl", "reboot"]) == 1


def test_doctor_reports_a_running_bootstrap_then_a_stale_one(node: Node) -> None:
    """Killed in the middle of a step (the node lost power, an operator's ^C): the state says
    running, but nothing holds the lock; doctor says so, with what to run."""
    node.fake_tools(ud_seconds=30)
    run = node.process()
    try:
        node.wait_for_step("driver")
        running = doctor_bootstrap_line(node)
        assert running["ok"] is None
        assert f"running step driver, pid {run.pid}" in running["detail"]
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # bootstrap and the tool it runs, as a power loss
        run.communicate(timeout=60)
    stale = doctor_bootstrap_line(node)
    assert stale["ok"] is False
    assert stale["detail"].startswith("stale: bootstrap.json says running step driver")
    assert f"its process (pid {run.pid}) is gone" in stale["detail"]
    assert stale["fix"].startswith("sudo gpud bootstrap")


def doctor_bootstrap_line(node: Node) -> dict:
    env = {**os.environ, "PATH": node.tools.path, "GPUD_ROOT": str(node.root)}
    out = subprocess.run(
        [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(node.tmp / "no.sock"),
         "doctor", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    (line,) = [c for c in json.loads(out.stdout)["checks"] if c["area"] == "bootstrap"]
    return line


# --- nvidia as containerd's default runtime ------------------------------------------------------


def default_runtime_of(node: Node) -> str | None:
    import tomllib

    cri = tomllib.loads(node.path(TEMPLATE).read_text())["plugins"]["io.containerd.grpc.v1.cri"]
    return cri["containerd"].get("default_runtime_name")


@pytest.mark.parametrize(
    ("config", "default", "cdi"),
    [
        ("", "nvidia", False),  # envvar: NVIDIA_VISIBLE_DEVICES works only through nvidia
        ("devicePlugin:\n  deviceListStrategy: cdi-cri\n", "${RUNTIME}", True),
        ("devicePlugin:\n  deviceListStrategy: [envvar, cdi-annotations]\n", "${RUNTIME}", True),
        ("toolkit:\n  setAsDefault: false\n", "${RUNTIME}", False),
        (
            "devicePlugin:\n  deviceListStrategy: cdi-cri\ntoolkit:\n  setAsDefault: true\n",
            "nvidia",
            True,
        ),
    ],
    ids=["envvar", "cdi", "mixed", "key-false", "key-true-with-cdi"],
)
def test_the_default_runtime_follows_the_strategy_unless_the_key_says(
    node: Node, capsys: pytest.CaptureFixture[str], config: str, default: str, cdi: bool
) -> None:
    if not FIXTURE.exists():
        unavailable(f"{FIXTURE} is not beside this checkout")
    node.reboot()
    node.dpkg("dpkg-550-server-signed", "dpkg")
    node.configure(config)
    rc, _, err = node.bootstrap(capsys)
    assert rc == 0, err
    assert default_runtime_of(node) == default
    assert ("enable_cdi = true" in node.path(TEMPLATE).read_text()) is cdi
    assert "nvidia" in node.path(TEMPLATE).read_text()


def test_cdi_with_nvidia_already_the_default_fails_with_the_line_to_change(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.reboot()
    node.dpkg("dpkg-550-server-signed", "dpkg")
    assert node.bootstrap(capsys)[0] == 0  # envvar: nvidia became the default
    node.configure("devicePlugin:\n  deviceListStrategy: cdi-cri\n")
    before = node.path(TEMPLATE).read_text()
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 1 and d["failed_step"] == "runtime"
    assert "nvidia is containerd's default runtime" in d["steps"][-1]["detail"]
    assert 'default_runtime_name back to "runc"' in d["fix"] and "setAsDefault" in d["fix"]
    assert node.path(TEMPLATE).read_text() == before


# --- kernels without prebuilt modules, Secure Boot ----------------------------------------------


def dkms_node(node: Node) -> None:
    shutil.copy(GOLDEN / "ubuntu-drivers-list-gpgpu-include-dkms.out", node.state / "list.out")
    after = golden("dpkg-550-server-dkms.out")
    (node.state / "after-ud.out").write_text(
        "".join(x for x in after.splitlines(True) if "-utils-" not in x)
    )
    node.dpkg("dpkg-550-server-dkms", "after-apt")


def test_a_kernel_without_prebuilt_modules_stops_at_the_driver_naming_the_key(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(GOLDEN / "ubuntu-drivers-list-gpgpu-needs-dkms.out", node.state / "list.out")
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 1 and d["failed_step"] == "driver"
    assert "no NVIDIA GPU" not in d["message"]
    assert "requires DKMS modules" in d["message"]
    assert "driver.includeDkms: true" in d["fix"]
    assert node.mutating() == []


def test_secure_boot_with_an_unenrolled_dkms_key_stops_armed_without_rebooting(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    dkms_node(node)
    node.secure_boot(True, "not-enrolled")
    node.configure("driver:\n  branch: 550-server\n  includeDkms: true\n")
    node.gpud_running()
    rc, d, err = node.bootstrap(capsys)
    assert rc == 1
    assert d["phase"] == AWAITING_MOK and d["failed_step"] == "driver"
    assert statuses(d) == {"driver": "mok-enrollment", "reboot": "mok-enrollment"}
    assert "sudo mokutil --import /var/lib/shim-signed/mok/MOK.der" in d["fix"]
    assert "MokManager" in d["fix"]
    assert "gpud: bootstrap stopped at step driver" in err
    assert ["systemctl", "reboot"] not in node.mutating()  # it would boot into a failure
    assert node.mutating() == [
        ["ubuntu-drivers", "install", "--gpgpu", "--include-dkms", "nvidia:550-server"],
        ["apt-get", "install", "-y", *LOCK_OPTION, "nvidia-utils-550-server"],
        ["systemctl", "enable", "gpud-bootstrap-resume.service"],
    ]
    assert node.path(RESUME_MARKER).exists()
    assert node.state_file()["phase"] == AWAITING_MOK

    # the unit in the same boot (or the operator, too early): refused, with the steps
    rc, d, _ = node.bootstrap(capsys, "--resume")
    assert rc == 1 and "MOK" in d["message"]

    # the operator enrolled the key at the console during the reboot: the resume finishes,
    # restarting the gpud that ran before the driver did
    node.secure_boot(True, "enrolled")
    node.reboot()
    rc, d, err = node.bootstrap(capsys, "--resume")
    assert rc == 0, err
    assert d["phase"] == "done"
    assert statuses(d)["driver"] == "already" and statuses(d)["service"] == "done"
    assert ["systemctl", "restart", "gpud.service"] in node.mutating()
    assert not node.path(RESUME_MARKER).exists()


# --- gpud after the driver's reboot ------------------------------------------------------------


def test_resume_restarts_a_gpud_that_ran_before_the_new_driver(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """The package started gpud before bootstrap installed the driver: after the reboot, the
    resume restarts it so that it opens NVML with the new driver."""
    node.gpud_running()
    assert node.bootstrap(capsys)[0] == 0
    node.reboot()
    rc, d, err = node.bootstrap(capsys, "--resume")
    assert rc == 0, err
    service = next(s for s in d["steps"] if s["name"] == "service")
    assert (service["status"], service["detail"]) == (
        "done",
        "restarted gpud.service on the new driver",
    )
    assert ["systemctl", "restart", "gpud.service"] in node.mutating()
    # once done, a later run does not restart it again
    rc, d, _ = node.bootstrap(capsys)
    assert rc == 0 and statuses(d)["service"] == "already"
    assert ["systemctl", "restart", "gpud.service"] not in node.mutating()
