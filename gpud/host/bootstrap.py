"""``gpud bootstrap``: the one command cloud-init runs to turn a fresh node into a GPU node.

Why it is a sequence of small steps with a state file: a new node needs the driver, usually a
reboot before that driver runs, then the toolkit, the containerd runtime entry, the CDI spec and
gpud itself, and cloud-init runs its commands once. So the steps after the reboot are handed to a
one-shot systemd unit (``gpud-bootstrap-resume.service``) that is armed by a marker file holding
the boot ID of the boot that armed it: it runs only in a later boot, and is disarmed (marker
removed, unit disabled) once the setup is done, not before: a resume that fails (the dpkg lock
held past its wait, a network not up yet) is retried a few times in that boot and again at the
next one, up to a bounded number of attempts, so a passing problem does not leave a node half
set up with nothing left to finish it. The unit ships in the gpud package (systemd/), so
bootstrap only enables it.

Every step first looks whether its work is already done, so running bootstrap again on a ready
node calls no command that changes anything. The first failing step stops the run, and the result
names it with the fix. Each step reuses the module that owns the work (driver_install,
toolkit_install, toolkit, cdi, mig.layout); this file only orders and records. One run at a time:
a lock in the state directory makes a second bootstrap (an operator's beside the resume unit)
stop at once, naming the first, instead of running ubuntu-drivers and a reboot twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpud.atomic import write_atomic
from gpud.config.models import Config, DeviceListStrategy
from gpud.host.commands import CommandRunner, missing, run_command
from gpud.host.locks import Holder, exclusive
from gpud.host.platform import under

STATE_FILE = "/var/lib/gpud/bootstrap.json"
RESUME_MARKER = "/var/lib/gpud/bootstrap.resume-pending"
LOCK_FILE = "/var/lib/gpud/bootstrap.lock"
RESUME_UNIT_NAME = "gpud-bootstrap-resume.service"
GPUD_UNIT = "gpud.service"
# Where systemd finds units: an operator's copy in /etc, the package's in /lib or /usr/lib.
UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
BOOT_ID = "/proc/sys/kernel/random/boot_id"
STEPS = ("driver", "reboot", "toolkit", "runtime", "cdi", "mig", "service")

DONE, ALREADY, REBOOT, SKIPPED, FAILED = "done", "already", "reboot", "skipped", "failed"
MOK = "mok-enrollment"
"""A step's status when Secure Boot needs DKMS's key enrolled at the console first."""
RUNNING, AWAITING_REBOOT, PHASE_DONE, PHASE_FAILED = "running", "awaiting-reboot", "done", "failed"
AWAITING_MOK = "awaiting-mok-enrollment"
RESUME_ATTEMPTS_PER_BOOT = 3
RESUME_MAX_FAILURES = 5
"""Failed resume runs, over all boots, after which the unit is disarmed: enough to outlast a
busy first boot (unattended-upgrades, a late network) and a reboot, not a loop at every boot."""
RESUME_RETRY_DELAY = 60.0


if TYPE_CHECKING:
    from gpud.host.containerd import RuntimeOptions
    from gpud.host.containerd_dump import Installed


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str
    """``done`` (changed something), ``already``, ``reboot``, ``mok-enrollment`` (waits for the
    operator to enroll DKMS's key), ``skipped`` or ``failed``."""
    detail: str
    fix: str | None = None
    retry: bool = False
    """A failure that can pass by itself (a lock, the network, a service restart): the resume
    tries again; the others need the operator."""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class BootstrapResult:
    phase: str
    """``done``, ``awaiting-reboot``, ``awaiting-mok-enrollment`` or ``failed`` (``running``
    only while it runs)."""
    steps: tuple[StepResult, ...]
    message: str
    state_file: str
    failed: StepResult | None = None

    @property
    def ok(self) -> bool:
        """No step failed (a run waiting for its reboot is a success: exit 0; one waiting for
        the operator to enroll a key is not: it stopped, and says how to go on)."""
        return self.failed is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "ok": self.ok,
            "message": self.message,
            "steps": [s.as_dict() for s in self.steps],
            "failed_step": self.failed.name if self.failed else None,
            "fix": self.failed.fix if self.failed else None,
            "state_file": self.state_file,
        }


@dataclass
class Context:
    """What the steps share: the root, the config, the runner and earlier steps' results."""

    root: Path
    config: Config
    run: CommandRunner
    previous: dict[str, Any]
    """The state file as the run found it (``{}`` when there was none)."""
    resume: bool = False
    results: dict[str, StepResult] = field(default_factory=dict)
    reboot_reasons: tuple[str, ...] = ()
    driver_changed: bool = False
    """The driver was installed by this bootstrap (this run, or the one before its reboot): a
    gpud that was running since then opened NVML before the new driver ran."""
    progress: Callable[[str], None] = lambda line: None


# --- pure decisions -----------------------------------------------------------------------------


def resume_decision(
    marker: str | None, state: dict[str, Any], boot_id: str | None
) -> tuple[str, str]:
    """What ``--resume`` does: (``proceed``|``nothing``|``refuse``, why).

    ``marker`` is the resume marker's text (the boot ID of the boot that armed the unit), None
    when there is no marker. The marker, not the phase, says the unit is armed: a resume that
    failed leaves it in place to be tried again. It proceeds only when the node has booted
    since (the boot ID differs). An unreadable boot ID on either side cannot prove the reboot
    did not happen, so it does not block.
    """
    if marker is None:
        return "nothing", "nothing to resume: no reboot is pending for gpud bootstrap"
    recorded = marker.strip() or state.get("boot_id")
    if recorded and boot_id and recorded == boot_id:
        if state.get("phase") == AWAITING_MOK:
            return "refuse", (
                "the node has not rebooted since gpud bootstrap stopped for the MOK enrollment "
                "(same boot ID); enroll the key and reboot at the console (the steps: sudo "
                "gpudctl driver status), and the resume unit finishes the setup"
            )
        return "refuse", (
            "the node has not rebooted since gpud bootstrap asked for it (same boot ID); "
            "reboot it (sudo systemctl reboot) and the resume unit finishes the setup"
        )
    return "proceed", "the node rebooted since the driver was installed"


def runtime_options(config: Config) -> RuntimeOptions:
    """The NVIDIA runtime as pods need it: CDI on when the device plugin hands devices out by
    CDI name; the default runtime as ``toolkit.setAsDefault`` says, else only without CDI.

    ``envvar`` alone needs it as the default (NVIDIA_VISIBLE_DEVICES is read by the nvidia
    runtime only, and pods name no runtime class). With CDI, containerd injects the devices
    itself, and NVIDIA's device plugin docs require nvidia not to be the default: as the
    default it would give any container of a CUDA image (NVIDIA_VISIBLE_DEVICES=all) every GPU.
    """
    from gpud.host.containerd import RuntimeOptions

    cdi = {DeviceListStrategy.CDI_ANNOTATIONS, DeviceListStrategy.CDI_CRI}
    uses_cdi = bool(cdi.intersection(config.device_plugin.device_list_strategy))
    default = config.toolkit.set_as_default
    return RuntimeOptions(
        set_as_default=not uses_cdi if default is None else default, enable_cdi=uses_cdi
    )


def progress_line(index: int, result: StepResult) -> str:
    return f"[{index}/{len(STEPS)}] {result.name}: {result.detail}"


# --- small effects ------------------------------------------------------------------------------


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_boot_id(root: Path) -> str | None:
    try:
        return under(root, BOOT_ID).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def read_marker(root: Path) -> str | None:
    """The resume marker's text (the arming boot's ID), None when the unit is not armed."""
    try:
        return under(root, RESUME_MARKER).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def read_state(root: Path) -> dict[str, Any]:
    """The state file, or ``{}`` when there is none or it is unreadable (then every step checks
    the node itself, which is what makes that safe)."""
    try:
        data = json.loads(under(root, STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(root: Path, state: dict[str, Any]) -> Path:
    path = under(root, STATE_FILE)
    state["updated"] = now_iso()
    write_atomic(path, (json.dumps(state, indent=2) + "\n").encode())
    return path


def _systemctl(run: CommandRunner, *args: str) -> tuple[bool, str]:
    result = run(["systemctl", *args], 120.0)
    detail = (result.stderr or result.stdout).strip().splitlines()
    return result.returncode == 0, (detail[-1] if detail else f"exit {result.returncode}")


def arm_resume(root: Path, run: CommandRunner, boot_id: str | None) -> tuple[bool, str]:
    """Write the marker with this boot's ID and enable the unit: it runs in a later boot."""
    write_atomic(under(root, RESUME_MARKER), f"{boot_id or ''}\n".encode())
    return _systemctl(run, "enable", RESUME_UNIT_NAME)


def disarm_resume(root: Path, run: CommandRunner) -> None:
    """Disable the resume unit and remove its marker: the setup is done, or given up.

    The marker goes first, so even a failed ``disable`` cannot make the unit run again.
    """
    under(root, RESUME_MARKER).unlink(missing_ok=True)
    if unit_installed(root, RESUME_UNIT_NAME):
        _systemctl(run, "disable", RESUME_UNIT_NAME)


def unit_installed(root: Path, name: str) -> bool:
    return any(under(root, f"{d}/{name}").exists() for d in UNIT_DIRS)


# --- steps --------------------------------------------------------------------------------------


def _numbered(steps: Sequence[str]) -> str:
    return "; ".join(f"{i}. {step}" for i, step in enumerate(steps, 1))


def step_driver(ctx: Context) -> StepResult:
    """Install the configured (else the recommended server) branch; never replace a driver."""
    from gpud.host.driver_install import install_driver

    d = ctx.config.driver
    try:
        r = install_driver(
            ctx.root,
            None,
            pinned=d.branch,
            include_dkms=d.include_dkms,
            run=ctx.run,
            lock_timeout=ctx.config.apt.lock_timeout,
            progress=ctx.progress,
        )
    except ValueError as exc:
        return StepResult("driver", FAILED, str(exc), "set driver.branch to e.g. 550-server")
    if r.result == "already-installed":
        return StepResult("driver", ALREADY, r.message)
    if r.result == "installed":
        return StepResult("driver", DONE, r.message)
    if r.result == "mok-enrollment-required":
        # A reboot without the enrollment boots into a driver that does not load: stop here,
        # armed, and let the operator's reboot (at the console) resume.
        return StepResult(
            "driver",
            MOK,
            r.message,
            _numbered(r.mok_steps) + f"; after that reboot {RESUME_UNIT_NAME} finishes the setup",
        )
    if r.result == "reboot-required":
        ctx.reboot_reasons = r.reboot_reasons
        if ctx.resume:
            # The reboot already happened once; rebooting again would loop.
            return StepResult(
                "driver",
                FAILED,
                "the driver is still not running after the reboot: " + "; ".join(r.reboot_reasons),
                "sudo gpudctl driver status shows why (nouveau, a missing module); fix it, "
                "reboot, then run sudo gpud bootstrap",
            )
        return StepResult("driver", REBOOT, r.message)
    fix = r.fix or "sudo gpudctl driver install shows the details"
    if r.plan is not None and r.plan.needs_dkms:
        fix = (
            "set driver.includeDkms: true in the config (DKMS builds the modules here), or boot "
            "a kernel with prebuilt modules; then run sudo gpud bootstrap"
        )
    detail = r.message + (f"\n{r.output_tail}" if r.output_tail else "")
    return StepResult("driver", FAILED, detail, fix, retry=r.result == "failed")


def step_reboot(ctx: Context) -> StepResult:
    """Arm the one-shot resume unit, record this boot, and reboot (only when the driver asks).

    With a DKMS module waiting for its key's enrollment the unit is armed the same way, but
    gpud does not reboot: only the operator at the console can enroll, during their reboot.
    """
    driver = ctx.results["driver"].status
    if driver not in (REBOOT, MOK):
        return StepResult("reboot", ALREADY, "no reboot needed: the driver is running")
    if not unit_installed(ctx.root, RESUME_UNIT_NAME):
        return StepResult(
            "reboot",
            FAILED,
            f"{RESUME_UNIT_NAME} is not installed: nothing would finish the setup after the reboot",
            "install the gpud package (it ships the unit), then run sudo gpud bootstrap again",
        )
    ok, why = arm_resume(ctx.root, ctx.run, read_boot_id(ctx.root))
    if not ok:
        return StepResult(
            "reboot",
            FAILED,
            f"cannot enable {RESUME_UNIT_NAME}: {why}",
            f"sudo systemctl enable {RESUME_UNIT_NAME}, then sudo systemctl reboot",
        )
    if driver == MOK:
        return StepResult(
            "reboot",
            MOK,
            "not rebooting: the driver's modules load only after DKMS's key is enrolled at the "
            f"console; {RESUME_UNIT_NAME} finishes the setup after that reboot",
        )
    return StepResult(
        "reboot", REBOOT, "rebooting; the remaining steps run after it (" + RESUME_UNIT_NAME + ")"
    )


def step_toolkit(ctx: Context) -> StepResult:
    from gpud.host.toolkit_install import InstallError, install_toolkit

    t = ctx.config.toolkit
    try:
        r = install_toolkit(
            ctx.run,
            ctx.root,
            t.apt_source,
            t.keyring,
            lock_timeout=ctx.config.apt.lock_timeout,
            progress=ctx.progress,
        )
    except InstallError as exc:
        return StepResult("toolkit", FAILED, str(exc), exc.fix or None, retry=True)
    if r.already_installed:
        return StepResult("toolkit", ALREADY, f"already installed ({r.version})")
    return StepResult("toolkit", DONE, f"installed nvidia-container-toolkit {r.version}")


def _restarter(run: CommandRunner, argv: Sequence[str]) -> Callable[[], None]:
    """configure_file's restart callable, through the runner (so tests see the call)."""
    from gpud.host.toolkit import RestartError

    def restart() -> None:
        result = run(list(argv), 180.0)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
            raise RestartError(f"'{' '.join(argv)}' failed: {detail}")

    return restart


def step_runtime(ctx: Context) -> StepResult:
    """The NVIDIA runtime in the config containerd really reads (MicroK8s: the template)."""
    from gpud.host.containerd import ConfigError
    from gpud.host.containerd_dump import DumpError, installed
    from gpud.host.platform import discover
    from gpud.host.toolkit import VerifyError, configure_file

    platform = discover(ctx.root, ctx.run)
    path = platform.resolve(platform.containerd_config)
    restart = _restarter(ctx.run, platform.restart_command)
    containerd = installed(ctx.root, platform.flavour)
    options = runtime_options(ctx.config)
    try:
        if not options.set_as_default:
            setter = _nvidia_default_set_by(path, ctx.root, containerd, options)
            if setter is not None:
                return StepResult(
                    "runtime",
                    FAILED,
                    f"nvidia is containerd's default runtime (set in {setter}), but this config "
                    "wants it not to be (toolkit.setAsDefault, or a CDI deviceListStrategy): any "
                    "container of a CUDA image would see every GPU",
                    f'set default_runtime_name back to "runc" in {setter} (plugins CRI '
                    "containerd table), or set toolkit.setAsDefault: true if you want nvidia as "
                    "the default; then run sudo gpud bootstrap",
                )
        r = configure_file(path, options, restart, root=ctx.root, containerd=containerd)
    except (DumpError, VerifyError) as exc:
        return StepResult(
            "runtime",
            FAILED,
            f"{platform.containerd_config} (and its imports) left as they were: {exc}",
            "fix what it names (sudo gpudctl toolkit status shows it), then sudo gpud bootstrap",
        )
    except ConfigError as exc:
        return StepResult(
            "runtime",
            FAILED,
            f"{platform.containerd_config} cannot be edited (left untouched): {exc}",
            f"fix {platform.containerd_config} so containerd can read it, then run "
            "sudo gpud bootstrap",
        )
    except OSError as exc:
        return StepResult(
            "runtime",
            FAILED,
            f"{platform.containerd_config}: {exc}",
            "install containerd (or MicroK8s) first, then run sudo gpud bootstrap",
            retry=True,
        )
    if not r.changed:
        return StepResult("runtime", ALREADY, f"{platform.containerd_config} already configured")
    if r.restart_error:
        return StepResult(
            "runtime",
            FAILED,
            f"{platform.containerd_config} configured but the restart failed: {r.restart_error}",
            f"sudo {' '.join(platform.restart_command)}",
            retry=True,
        )
    return StepResult(
        "runtime",
        DONE,
        f"configured {platform.containerd_config}; ran {' '.join(platform.restart_command)}",
    )


def _nvidia_default_set_by(
    path: Path, root: Path, containerd: Installed | None, options: RuntimeOptions
) -> str | None:
    """The file that makes nvidia containerd's default runtime, judged on the merged config
    (a drop-in may set it); None when it is not the default or the config does not read (left
    to configure_file, which says why)."""
    from gpud.host.toolkit import inspect

    seen = inspect(path, root=root, containerd=containerd, options=options)
    if not seen.default or seen.merged is None:
        return None
    return seen.merged.default.source or str(path)


def step_cdi(ctx: Context) -> StepResult:
    """Generate the CDI spec unless a valid one exists from an earlier run of this driver."""
    from gpud.host.cdi import DEFAULT_OUTPUT, generate_spec, read_spec, spec_problems

    output = under(ctx.root, str(DEFAULT_OUTPUT))
    spec = read_spec(output)
    earlier = ctx.previous.get("steps", {}).get("cdi", {}).get("status") in (DONE, ALREADY)
    driver_same = ctx.results["driver"].status == ALREADY
    if (
        earlier
        and driver_same
        and spec["exists"]
        and not spec["error"]
        and not spec_problems(spec["kind"], tuple(spec["devices"]))
    ):
        return StepResult("cdi", ALREADY, f"{DEFAULT_OUTPUT} is current")
    r = generate_spec(ctx.run, output)
    if r.status == "skipped":
        return StepResult("cdi", SKIPPED, r.message)
    if not r.ok:
        return StepResult(
            "cdi", FAILED, r.message, "sudo gpudctl toolkit cdi shows the details", retry=True
        )
    return StepResult("cdi", DONE, f"wrote {DEFAULT_OUTPUT} ({len(r.devices)} devices)")


def step_mig(ctx: Context) -> StepResult:
    """Check the configured layout exists; gpud itself applies it at start (mig.layout)."""
    from gpud.mig import layout

    name = ctx.config.mig.layout
    if not name:
        return StepResult("mig", SKIPPED, "no mig.layout in the config")
    source = ctx.config.mig.config_file
    try:
        layouts = layout.load(under(ctx.root, str(source))) if source else layout.bundled()
    except layout.LayoutError as exc:
        return StepResult("mig", FAILED, str(exc), f"fix {source} (gpud config validate)")
    if name not in layouts.configs:
        where = str(source) if source else "gpud's bundled layouts"
        return StepResult(
            "mig",
            FAILED,
            f"no MIG layout named {name!r} in {where}",
            f"set mig.layout to one of: {', '.join(layouts.names)}",
        )
    before = ctx.previous.get("steps", {}).get("mig", {})
    status = ALREADY if before.get("layout") == name else DONE
    return StepResult("mig", status, f"gpud applies {name} at start")


def step_service(ctx: Context) -> StepResult:
    """Enable and start gpud.service from the package; a missing unit means no package.

    Another project's gpud would make ``gpud.service`` mean that daemon, so it stops the step.
    A gpud already running when this bootstrap installed the driver (in this run, or in the run
    before the reboot that the resume finishes) may have opened NVML before the new driver ran:
    it is restarted so that it opens the GPUs with it.
    """
    from gpud.host.conflicts import describe, find_conflicts, fix_steps

    if not unit_installed(ctx.root, GPUD_UNIT):
        return StepResult(
            "service", FAILED, f"{GPUD_UNIT} is not installed", "install the gpud package"
        )
    conflicts = find_conflicts(ctx.root)
    if conflicts:
        fix = "; ".join(fix_steps(conflicts))
        return StepResult("service", FAILED, describe(conflicts), fix)
    enabled = ctx.run(["systemctl", "is-enabled", GPUD_UNIT], 30.0)
    active = ctx.run(["systemctl", "is-active", GPUD_UNIT], 30.0)
    if missing(enabled):
        return StepResult("service", FAILED, "systemctl not found", "run on a systemd node")
    running = active.stdout.strip() == "active"
    if enabled.stdout.strip() == "enabled" and running:
        if not (ctx.driver_changed or ctx.results["driver"].status == DONE):
            return StepResult("service", ALREADY, f"{GPUD_UNIT} enabled and running")
        ok, why = _systemctl(ctx.run, "restart", GPUD_UNIT)
        if not ok:
            return StepResult(
                "service",
                FAILED,
                f"systemctl restart {GPUD_UNIT} failed: {why}",
                f"journalctl -u {GPUD_UNIT} shows why gpud does not start",
                retry=True,
            )
        return StepResult("service", DONE, f"restarted {GPUD_UNIT} on the new driver")
    ok, why = _systemctl(ctx.run, "enable", "--now", GPUD_UNIT)
    if not ok:
        return StepResult(
            "service",
            FAILED,
            f"systemctl enable --now {GPUD_UNIT} failed: {why}",
            f"journalctl -u {GPUD_UNIT} shows why gpud does not start",
            retry=True,
        )
    return StepResult("service", DONE, f"enabled and started {GPUD_UNIT}")


STEP_FUNCTIONS: dict[str, Callable[[Context], StepResult]] = {
    "driver": step_driver,
    "reboot": step_reboot,
    "toolkit": step_toolkit,
    "runtime": step_runtime,
    "cdi": step_cdi,
    "mig": step_mig,
    "service": step_service,
}


# --- the run ------------------------------------------------------------------------------------


class Busy(RuntimeError):
    """Another gpud bootstrap holds the run lock: this one did nothing."""

    def __init__(self, holder: Holder) -> None:
        super().__init__(
            f"another gpud bootstrap is running: {holder} holds {LOCK_FILE}; this one did "
            f"nothing. Wait for it to end (its output; journalctl -u {RESUME_UNIT_NAME} -f when "
            "it is the resume unit): running bootstrap again after it is safe"
        )
        self.holder = holder


def pause(seconds: float) -> None:
    """The wait between resume attempts (its own function so that tests can replace it)."""
    time.sleep(seconds)


def bootstrap(
    root: Path,
    config: Config,
    *,
    resume: bool = False,
    config_path: str | None = None,
    run: CommandRunner = run_command,
    progress: Callable[[str], None] = print,
) -> BootstrapResult:
    """Run the steps in order, recording each in the state file as it finishes.

    One run at a time: raises :class:`Busy` when another holds the lock. ``--resume`` (the
    unit's command) first checks that the unit is armed and the node rebooted since; a failing
    resume is tried again (:data:`RESUME_ATTEMPTS_PER_BOOT`, when the failure can pass by
    itself) and left armed for the next boot until :data:`RESUME_MAX_FAILURES`. Whichever run
    finishes the setup (the unit's or a plain one) disarms the unit. The caller checks root and
    loads the config.
    """
    with exclusive(under(root, LOCK_FILE)) as other:
        if other is not None:
            raise Busy(other)
        return _bootstrap(root, config, resume, config_path, run, progress)


def _bootstrap(
    root: Path,
    config: Config,
    resume: bool,
    config_path: str | None,
    run: CommandRunner,
    progress: Callable[[str], None],
) -> BootstrapResult:
    previous = read_state(root)
    boot_id = read_boot_id(root)
    state_path = str(under(root, STATE_FILE))
    if resume:
        action, why = resume_decision(read_marker(root), previous, boot_id)
        if action == "nothing":
            progress(why)
            return BootstrapResult(previous.get("phase", PHASE_DONE), (), why, state_path)
        if action == "refuse":
            fix = "sudo systemctl reboot"
            if previous.get("phase") == AWAITING_MOK:
                fix = "sudo gpudctl driver status lists the enrollment steps; then reboot"
            step = StepResult("reboot", FAILED, why, fix)
            return BootstrapResult(PHASE_FAILED, (step,), why, state_path, step)
    attempts = RESUME_ATTEMPTS_PER_BOOT if resume else 1
    for attempt in range(1, attempts + 1):
        result, state = _run(root, config, run, progress, previous, boot_id, config_path, resume)
        if result.phase == PHASE_DONE:
            if read_marker(root) is not None:
                disarm_resume(root, run)
            return result
        if result.phase != PHASE_FAILED or not resume:
            return result  # waiting for a reboot or an enrollment, or the operator's own run
        failures = state["resume_failures"] = int(state.get("resume_failures", 0)) + 1
        write_state(root, state)
        assert result.failed is not None
        if failures >= RESUME_MAX_FAILURES:
            disarm_resume(root, run)
            return _amend(
                result,
                f"gave up after {failures} attempts: {RESUME_UNIT_NAME} is disabled; fix the "
                "cause, then run sudo gpud bootstrap",
            )
        if attempt == attempts or not result.failed.retry:
            return _amend(
                result,
                f"{RESUME_UNIT_NAME} stays armed and tries again at the next boot "
                f"({failures} of {RESUME_MAX_FAILURES} attempts used); or fix it and run sudo "
                "gpud bootstrap now",
            )
        progress(
            f"attempt {attempt} of {attempts} failed at step {result.failed.name}; trying again "
            f"in {RESUME_RETRY_DELAY:g} s"
        )
        pause(RESUME_RETRY_DELAY)
        previous = read_state(root)
    raise AssertionError("unreachable: the last attempt returns")


def _amend(result: BootstrapResult, more: str) -> BootstrapResult:
    return BootstrapResult(
        result.phase, result.steps, f"{result.message}; {more}", result.state_file, result.failed
    )


def _carried(previous: dict[str, Any]) -> dict[str, Any]:
    """What an unfinished bootstrap hands to the next run: how often the resume failed, and
    that the driver changed (so gpud is restarted even when the driver step is now "already")."""
    if previous.get("phase") == PHASE_DONE:
        return {}
    keys = ("resume_failures", "driver_changed")
    return {k: previous[k] for k in keys if k in previous}


def _run(
    root: Path,
    config: Config,
    run: CommandRunner,
    progress: Callable[[str], None],
    previous: dict[str, Any],
    boot_id: str | None,
    config_path: str | None,
    resume: bool,
) -> tuple[BootstrapResult, dict[str, Any]]:
    """One pass over the steps; the state file says which step runs, and each result."""
    carried = _carried(previous)
    ctx = Context(
        root,
        config,
        run,
        previous,
        resume=resume,
        driver_changed=bool(carried.get("driver_changed")),
        progress=progress,
    )
    state_path = str(under(root, STATE_FILE))
    state: dict[str, Any] = {
        "phase": RUNNING,
        "started": now_iso(),
        "pid": os.getpid(),
        "config": config_path or previous.get("config"),
        **carried,
        "steps": {},
    }
    done: list[StepResult] = []
    for index, name in enumerate(STEPS, 1):
        state["step"] = name
        write_state(root, state)
        result = STEP_FUNCTIONS[name](ctx)
        ctx.results[name] = result
        done.append(result)
        if name == "driver" and result.status in (DONE, REBOOT, MOK):
            ctx.driver_changed = state["driver_changed"] = True
        entry: dict[str, Any] = {"status": result.status, "detail": result.detail}
        entry["time"] = now_iso()
        if name == "mig" and result.status in (DONE, ALREADY):
            entry["layout"] = config.mig.layout
        if result.fix:
            entry["fix"] = result.fix
        state["steps"][name] = entry
        progress(progress_line(index, result))
        if result.status == FAILED:
            state.update(phase=PHASE_FAILED, failed_step=name)
            write_state(root, state)
            message = f"step {name} failed: {result.detail}"
            return BootstrapResult(PHASE_FAILED, tuple(done), message, state_path, result), state
        if name == "reboot" and result.status == MOK:
            driver = ctx.results["driver"]
            state.update(phase=AWAITING_MOK, boot_id=boot_id, failed_step="driver")
            write_state(root, state)
            message = (
                "stopped before rebooting: Secure Boot loads the new driver only once DKMS's key "
                f"is enrolled at the console: {driver.fix}"
            )
            return BootstrapResult(AWAITING_MOK, tuple(done), message, state_path, driver), state
        if name == "reboot" and result.status == REBOOT:
            state.update(phase=AWAITING_REBOOT, boot_id=boot_id)
            write_state(root, state)
            return _reboot(root, run, tuple(done), state_path, progress), state
    for key in ("step", "driver_changed", "resume_failures"):
        state.pop(key, None)
    state["phase"] = PHASE_DONE
    write_state(root, state)
    changed = [s.name for s in done if s.status == DONE]
    message = (
        f"the node is ready ({', '.join(changed)} changed)"
        if changed
        else "the node is ready; nothing changed"
    )
    return BootstrapResult(PHASE_DONE, tuple(done), message, state_path), state


def _reboot(
    root: Path,
    run: CommandRunner,
    steps: tuple[StepResult, ...],
    state_path: str,
    progress: Callable[[str], None],
) -> BootstrapResult:
    """Reboot last, after the state says awaiting-reboot: the resume unit needs that record."""
    progress("rebooting now; gpud bootstrap continues after the reboot")
    ok, why = _systemctl(run, "reboot")
    if not ok:
        step = StepResult(
            "reboot",
            FAILED,
            f"systemctl reboot failed: {why}",
            f"reboot the node (sudo reboot); {RESUME_UNIT_NAME} finishes the setup after it",
        )
        return BootstrapResult(AWAITING_REBOOT, (*steps[:-1], step), step.detail, state_path, step)
    return BootstrapResult(
        AWAITING_REBOOT,
        steps,
        "driver installed; the node reboots and the remaining steps run after it",
        state_path,
    )
