"""``gpud bootstrap``: the one command cloud-init runs to turn a fresh node into a GPU node.

Why it is a sequence of small steps with a state file: a new node needs the driver, usually a
reboot before that driver runs, then the toolkit, the containerd runtime entry, the CDI spec and
gpud itself, and cloud-init runs its commands once. So the steps after the reboot are handed to a
one-shot systemd unit (``gpud-bootstrap-resume.service``) that is armed by a marker file and the
boot ID of the boot that asked for the reboot: it runs exactly once, only in a later boot, and
disables itself. The unit ships in the gpud package (systemd/), so bootstrap only enables it.
Every step first looks whether its work is already done, so running bootstrap again on a ready
node calls no command that changes anything. The first failing step stops the
run, and the result names it with the fix. Each step reuses the module that owns the work
(driver_install, toolkit_install, toolkit, cdi, mig.layout); this file only orders and records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpud.atomic import write_atomic
from gpud.config.models import Config, DeviceListStrategy
from gpud.host.commands import CommandRunner, missing, run_command
from gpud.host.platform import under

STATE_FILE = "/var/lib/gpud/bootstrap.json"
RESUME_MARKER = "/var/lib/gpud/bootstrap.resume-pending"
RESUME_UNIT_NAME = "gpud-bootstrap-resume.service"
GPUD_UNIT = "gpud.service"
# Where systemd finds units: an operator's copy in /etc, the package's in /lib or /usr/lib.
UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
BOOT_ID = "/proc/sys/kernel/random/boot_id"
STEPS = ("driver", "reboot", "toolkit", "runtime", "cdi", "mig", "service")

DONE, ALREADY, REBOOT, SKIPPED, FAILED = "done", "already", "reboot", "skipped", "failed"
RUNNING, AWAITING_REBOOT, PHASE_DONE, PHASE_FAILED = "running", "awaiting-reboot", "done", "failed"


if TYPE_CHECKING:
    from gpud.host.containerd import RuntimeOptions


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str
    """``done`` (changed something), ``already``, ``reboot``, ``skipped`` or ``failed``."""
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class BootstrapResult:
    phase: str
    """``done``, ``awaiting-reboot`` or ``failed`` (``running`` only while it runs)."""
    steps: tuple[StepResult, ...]
    message: str
    state_file: str
    failed: StepResult | None = None

    @property
    def ok(self) -> bool:
        """No step failed (a run waiting for its reboot is a success: exit 0)."""
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


# --- pure decisions -----------------------------------------------------------------------------


def resume_decision(state: dict[str, Any], marker: bool, boot_id: str | None) -> tuple[str, str]:
    """What ``--resume`` does: (``proceed``|``nothing``|``refuse``, why).

    It proceeds only when a reboot was asked for (phase awaiting-reboot and the marker present)
    and the node has booted since (the boot ID differs from the one recorded). An unreadable
    boot ID on either side cannot prove the reboot did not happen, so it does not block.
    """
    if state.get("phase") != AWAITING_REBOOT or not marker:
        return "nothing", "nothing to resume: no reboot is pending for gpud bootstrap"
    recorded = state.get("boot_id")
    if recorded and boot_id and recorded == boot_id:
        return "refuse", (
            "the node has not rebooted since gpud bootstrap asked for it (same boot ID); "
            "reboot it (sudo systemctl reboot) and the resume unit finishes the setup"
        )
    return "proceed", "the node rebooted since the driver was installed"


def runtime_options(config: Config) -> RuntimeOptions:
    """The NVIDIA runtime as pods need it: the default runtime (pods name no runtime class),
    CDI on when the device plugin hands devices out by CDI name."""
    from gpud.host.containerd import RuntimeOptions

    cdi = {DeviceListStrategy.CDI_ANNOTATIONS, DeviceListStrategy.CDI_CRI}
    uses_cdi = bool(cdi.intersection(config.device_plugin.device_list_strategy))
    return RuntimeOptions(set_as_default=True, enable_cdi=uses_cdi)


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


def disarm_resume(root: Path, run: CommandRunner) -> None:
    """Disable the resume unit and remove its marker: the reboot happened, its work is being done.

    The marker goes first, so even a failed ``disable`` cannot make the unit run a second time.
    """
    under(root, RESUME_MARKER).unlink(missing_ok=True)
    if unit_installed(root, RESUME_UNIT_NAME):
        _systemctl(run, "disable", RESUME_UNIT_NAME)


def unit_installed(root: Path, name: str) -> bool:
    return any(under(root, f"{d}/{name}").exists() for d in UNIT_DIRS)


# --- steps --------------------------------------------------------------------------------------


def step_driver(ctx: Context) -> StepResult:
    """Install the configured (else the recommended server) branch; never replace a driver."""
    from gpud.host.driver_install import install_driver

    try:
        r = install_driver(ctx.root, None, pinned=ctx.config.driver.branch, run=ctx.run)
    except ValueError as exc:
        return StepResult("driver", FAILED, str(exc), "set driver.branch to e.g. 550-server")
    if r.result == "already-installed":
        return StepResult("driver", ALREADY, r.message)
    if r.result == "installed":
        return StepResult("driver", DONE, r.message)
    if r.result == "reboot-required":
        ctx.reboot_reasons = r.reboot_reasons
        if ctx.resume:
            # The reboot already happened once; rebooting again would loop.
            return StepResult(
                "driver",
                FAILED,
                "the driver is still not running after the reboot: " + "; ".join(r.reboot_reasons),
                "sudo gpudctl driver status shows why (Secure Boot MOK, nouveau, a missing "
                "module); fix it, reboot, then run sudo gpud bootstrap",
            )
        return StepResult("driver", REBOOT, r.message)
    fix = r.fix or "sudo gpudctl driver install shows the details"
    detail = r.message + (f"\n{r.output_tail}" if r.output_tail else "")
    return StepResult("driver", FAILED, detail, fix)


def step_reboot(ctx: Context) -> StepResult:
    """Arm the one-shot resume unit, record this boot, and reboot (only when the driver asks)."""
    if ctx.results["driver"].status != REBOOT:
        return StepResult("reboot", ALREADY, "no reboot needed: the driver is running")
    if not unit_installed(ctx.root, RESUME_UNIT_NAME):
        return StepResult(
            "reboot",
            FAILED,
            f"{RESUME_UNIT_NAME} is not installed: nothing would finish the setup after the reboot",
            "install the gpud package (it ships the unit), then run sudo gpud bootstrap again",
        )
    write_atomic(under(ctx.root, RESUME_MARKER), f"{read_boot_id(ctx.root) or ''}\n".encode())
    ok, why = _systemctl(ctx.run, "enable", RESUME_UNIT_NAME)
    if not ok:
        return StepResult(
            "reboot",
            FAILED,
            f"cannot enable {RESUME_UNIT_NAME}: {why}",
            f"sudo systemctl enable {RESUME_UNIT_NAME}, then sudo systemctl reboot",
        )
    return StepResult(
        "reboot", REBOOT, "rebooting; the remaining steps run after it (" + RESUME_UNIT_NAME + ")"
    )


def step_toolkit(ctx: Context) -> StepResult:
    from gpud.host.toolkit_install import InstallError, install_toolkit

    t = ctx.config.toolkit
    try:
        r = install_toolkit(ctx.run, ctx.root, t.apt_source, t.keyring)
    except InstallError as exc:
        return StepResult("toolkit", FAILED, str(exc), exc.fix or None)
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
    try:
        r = configure_file(
            path, runtime_options(ctx.config), restart, root=ctx.root, containerd=containerd
        )
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
        )
    if not r.changed:
        return StepResult("runtime", ALREADY, f"{platform.containerd_config} already configured")
    if r.restart_error:
        return StepResult(
            "runtime",
            FAILED,
            f"{platform.containerd_config} configured but the restart failed: {r.restart_error}",
            f"sudo {' '.join(platform.restart_command)}",
        )
    return StepResult(
        "runtime",
        DONE,
        f"configured {platform.containerd_config}; ran {' '.join(platform.restart_command)}",
    )


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
        return StepResult("cdi", FAILED, r.message, "sudo gpudctl toolkit cdi shows the details")
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
    A gpud already running when this run installed the driver started without one: it is
    restarted so that it opens the GPUs.
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
        if ctx.results["driver"].status != DONE:
            return StepResult("service", ALREADY, f"{GPUD_UNIT} enabled and running")
        ok, why = _systemctl(ctx.run, "restart", GPUD_UNIT)
        if not ok:
            return StepResult(
                "service",
                FAILED,
                f"systemctl restart {GPUD_UNIT} failed: {why}",
                f"journalctl -u {GPUD_UNIT} shows why gpud does not start",
            )
        return StepResult("service", DONE, f"restarted {GPUD_UNIT} on the new driver")
    ok, why = _systemctl(ctx.run, "enable", "--now", GPUD_UNIT)
    if not ok:
        return StepResult(
            "service",
            FAILED,
            f"systemctl enable --now {GPUD_UNIT} failed: {why}",
            f"journalctl -u {GPUD_UNIT} shows why gpud does not start",
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

    ``--resume`` (the unit's command) first checks that a reboot was asked for and happened; a
    plain run that finds the reboot done does the unit's cleanup itself, so the unit never runs
    a second bootstrap. The caller checks root and loads the config.
    """
    previous = read_state(root)
    marker = under(root, RESUME_MARKER).exists()
    boot_id = read_boot_id(root)
    state_path = str(under(root, STATE_FILE))
    if resume:
        action, why = resume_decision(previous, marker, boot_id)
        if action == "nothing":
            progress(why)
            return BootstrapResult(previous.get("phase", PHASE_DONE), (), why, state_path)
        if action == "refuse":
            step = StepResult("reboot", FAILED, why, "sudo systemctl reboot")
            return BootstrapResult(PHASE_FAILED, (step,), why, state_path, step)
    if resume_decision(previous, marker, boot_id)[0] == "proceed":
        disarm_resume(root, run)  # a plain run after the reboot does the unit's work itself

    ctx = Context(root, config, run, previous, resume=resume)
    state: dict[str, Any] = {
        "phase": RUNNING,
        "started": now_iso(),
        "config": config_path or previous.get("config"),
        "steps": {},
    }
    write_state(root, state)
    done: list[StepResult] = []
    for index, name in enumerate(STEPS, 1):
        result = STEP_FUNCTIONS[name](ctx)
        ctx.results[name] = result
        done.append(result)
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
            return BootstrapResult(PHASE_FAILED, tuple(done), message, state_path, result)
        if name == "reboot" and result.status == REBOOT:
            state.update(phase=AWAITING_REBOOT, boot_id=boot_id)
            write_state(root, state)
            return _reboot(root, run, tuple(done), state_path, progress)
        write_state(root, state)
    state["phase"] = PHASE_DONE
    write_state(root, state)
    changed = [s.name for s in done if s.status == DONE]
    message = (
        f"the node is ready ({', '.join(changed)} changed)"
        if changed
        else "the node is ready; nothing changed"
    )
    return BootstrapResult(PHASE_DONE, tuple(done), message, state_path)


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
