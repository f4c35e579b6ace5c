"""Install the NVIDIA driver with ``ubuntu-drivers`` (``gpudctl driver install``).

``ubuntu-drivers`` does the package selection (headless metapackage, Canonical's signed prebuilt
modules for the running kernel) but its exit status is 0 whatever happened, it never loads the
module, and a transitional package can quietly pull another branch than the one named. So the
decision what to do is a pure function of the driver's status and the candidates
(:func:`plan_install`), and the outcome is never taken from the tools' exit codes: dpkg and the
module are read again afterwards (:func:`install_driver`), the branch actually installed is the
one recorded, and a module that is not loaded yet is reported as "reboot required", not success.

A working driver is never removed: asking for another branch than the one installed is refused
with the commands that would do it by hand, so replacing a driver stays the operator's decision.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpud.atomic import write_atomic
from gpud.host.commands import CommandRunner, missing, run_command
from gpud.host.driver import DriverStatus, Package, driver_status
from gpud.host.platform import under

LIST_ARGV = ("ubuntu-drivers", "list", "--gpgpu")
STATE_DIR = "/var/lib/gpud"
STATE_FILE = "driver.json"
# argv[0] absolute: the runner takes no environment, and env(1) then finds apt-get on PATH.
NONINTERACTIVE = ("/usr/bin/env", "DEBIAN_FRONTEND=noninteractive")
INSTALL_TIMEOUT = 1800.0
_TAIL_LINES = 15

_CANDIDATE = re.compile(r"^nvidia-driver-(?P<branch>\d+)(?P<server>-server)?(?P<open>-open)?$")
_MODULES_BY = re.compile(r"\(kernel modules provided by (?P<modules>[^)\s]+)\)")
_WANTED = re.compile(r"^(?:nvidia:)?(?P<branch>\d+)(?P<server>-server)?(?P<open>-open)?$")


@dataclass(frozen=True)
class Candidate:
    """One ``nvidia-driver-*`` line of ``ubuntu-drivers list --gpgpu``."""

    package: str
    branch: str
    server: bool
    open: bool
    modules: str | None
    """The prebuilt modules metapackage ubuntu-drivers named, if any (none: DKMS only)."""

    @property
    def flavour(self) -> str:
        """``535-server``, ``550-server-open``: what follows ``nvidia:`` in ``install --gpgpu``."""
        return flavour(self.branch, self.server, self.open)


@dataclass(frozen=True)
class WantedBranch:
    """A ``--branch`` value; ``server``/``open`` None when the operator did not say."""

    branch: str
    server: bool | None
    open: bool | None

    def __str__(self) -> str:
        return self.branch + ("-server" if self.server else "") + ("-open" if self.open else "")


@dataclass(frozen=True)
class InstallPlan:
    action: str
    """``nothing`` (already there), ``install`` or ``refuse``."""
    reason: str
    candidate: Candidate | None = None
    commands: tuple[tuple[str, ...], ...] = ()
    fix: str | None = None
    reboot_required: bool = False
    reboot_reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "branch": self.candidate.flavour if self.candidate else None,
            "commands": [" ".join(c) for c in self.commands],
            "fix": self.fix,
        }


@dataclass(frozen=True)
class InstallResult:
    """What ``gpudctl driver install`` reports; :meth:`as_dict` is its ``-o json`` form."""

    result: str
    """``already-installed``, ``installed``, ``reboot-required``, ``dry-run``, ``refused`` or
    ``failed``; only the last two are failures (exit 1)."""
    message: str
    requested_branch: str | None = None
    installed_branch: str | None = None
    packages: tuple[str, ...] = ()
    reboot_required: bool = False
    reboot_reasons: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    fix: str | None = None
    notes: tuple[str, ...] = ()
    output_tail: str | None = None
    state_file: str | None = None
    plan: InstallPlan | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.result not in ("refused", "failed")

    def as_dict(self) -> dict[str, Any]:
        """Keys: ``result`` (see above), ``ok`` (bool; the exit status is 0 exactly when true),
        ``message``, ``requested_branch`` (the flavour asked of ubuntu-drivers, e.g.
        ``550-server``), ``installed_branch`` (the branch dpkg shows afterwards: may differ when
        a transitional package pulled another), ``packages`` (installed driver packages),
        ``reboot_required`` (bool: the new module is not running yet; exit status is still 0),
        ``reboot_reasons``, ``commands`` (run, or that would run with --dry-run), ``fix``,
        ``notes``, ``output_tail`` (the tools' last lines on failure), ``state_file``.
        """
        return {
            "result": self.result,
            "ok": self.ok,
            "message": self.message,
            "requested_branch": self.requested_branch,
            "installed_branch": self.installed_branch,
            "packages": list(self.packages),
            "reboot_required": self.reboot_required,
            "reboot_reasons": list(self.reboot_reasons),
            "commands": list(self.commands),
            "fix": self.fix,
            "notes": list(self.notes),
            "output_tail": self.output_tail,
            "state_file": self.state_file,
        }


# --- pure -------------------------------------------------------------------------------------


def flavour(branch: str, server: bool, is_open: bool) -> str:
    return branch + ("-server" if server else "") + ("-open" if is_open else "")


def parse_candidates(stdout: str) -> tuple[Candidate, ...]:
    """``ubuntu-drivers list --gpgpu``: one package a line, bare or with its modules package.

    Only ``nvidia-driver-*`` lines are drivers; anything else (warnings, other vendors) is
    skipped rather than trusted.
    """
    found: dict[str, Candidate] = {}
    for line in stdout.splitlines():
        name = line.split(",", 1)[0].strip()
        m = _CANDIDATE.match(name)
        if not m or name in found:
            continue
        mods = _MODULES_BY.search(line)
        found[name] = Candidate(
            name,
            m.group("branch"),
            bool(m.group("server")),
            bool(m.group("open")),
            mods.group("modules") if mods else None,
        )
    return tuple(found.values())


def parse_wanted(text: str) -> WantedBranch:
    """``550``, ``550-server``, ``nvidia:550-server-open`` → :class:`WantedBranch`.

    A bare number leaves server/open open: the server variant is then preferred (see
    :func:`choose`). Raises ValueError on anything else.
    """
    m = _WANTED.match(text.strip())
    if not m:
        raise ValueError(
            f"--branch {text!r} is not a driver branch: give a number such as 550, "
            "or 550-server, 550-server-open"
        )
    server = True if m.group("server") else None
    is_open = True if m.group("open") else None
    if m.group("server") and not m.group("open"):
        is_open = False
    return WantedBranch(m.group("branch"), server, is_open)


def choose(candidates: Sequence[Candidate], wanted: WantedBranch | None) -> Candidate | None:
    """The candidate to install.

    Without a wanted branch: the highest ``-server`` branch (the datacenter branches, with the
    longer support), its proprietary-module variant when both are listed; with no server branch
    at all, the highest listed. With one: the listed variant that fits it, server preferred.
    """
    if wanted is not None:
        fits = [
            c
            for c in candidates
            if c.branch == wanted.branch
            and (wanted.server is None or c.server == wanted.server)
            and (wanted.open is None or c.open == wanted.open)
        ]
    else:
        fits = [c for c in candidates if c.server] or list(candidates)
    if not fits:
        return None
    return max(fits, key=lambda c: (int(c.branch), c.server, not c.open))


def utils_package(c: Candidate) -> str:
    """``--gpgpu`` leaves out nvidia-smi; its package has no ``-open`` variant."""
    return f"nvidia-utils-{c.branch}{'-server' if c.server else ''}"


def meta_packages(c: Candidate) -> tuple[str, ...]:
    """Any one of these installed means ubuntu-drivers installed the driver of ``c``."""
    f = c.flavour
    return (f"nvidia-headless-no-dkms-{f}", f"nvidia-headless-{f}", f"nvidia-driver-{f}")


def install_commands(c: Candidate) -> tuple[tuple[str, ...], ...]:
    return (
        (*NONINTERACTIVE, "ubuntu-drivers", "install", "--gpgpu", f"nvidia:{c.flavour}"),
        (*NONINTERACTIVE, "apt-get", "install", "-y", utils_package(c)),
    )


def _matches(status: DriverStatus, wanted: WantedBranch) -> bool:
    """The installed driver is the wanted one (a transitional package's branch counts too)."""
    b = status.branch
    if b.branch is None:
        return False
    if wanted.branch != b.branch and wanted.branch not in b.branches:
        return False
    if wanted.branch == b.branch:
        if wanted.server is not None and wanted.server != b.server:
            return False
        if wanted.open is not None and wanted.open != b.open:
            return False
    return True


def _manual_replace(status: DriverStatus, c: Candidate | None, wanted: WantedBranch) -> str:
    old = [p.name for p in status.facts.packages if p.installed and "nvidia" in p.name]
    steps = []
    if old:
        steps.append(f"sudo apt-get purge -y {' '.join(old)}")
    target = c.flavour if c else str(wanted)
    utils = utils_package(c) if c else f"nvidia-utils-{wanted.branch}-server"
    steps += [
        f"sudo ubuntu-drivers install --gpgpu nvidia:{target}",
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {utils}",
        "sudo reboot",
    ]
    return " && ".join(steps)


def _installed_names(pkgs: Sequence[Package]) -> set[str]:
    return {p.name for p in pkgs if p.installed}


def plan_install(
    status: DriverStatus,
    wanted: WantedBranch | None,
    candidates: Sequence[Candidate] | None,
) -> InstallPlan:
    """What ``driver install`` should do; ``candidates`` None when ubuntu-drivers is missing.

    Order matters: a broken dpkg first (nothing can be installed), then a driver already in
    place (never touched: nothing to do when it is the wanted one, refused when it is not), and
    only then the candidates, so a node with a working driver needs no ubuntu-drivers at all.
    """
    f, b = status.facts, status.branch
    if f.dpkg_error:
        return InstallPlan(
            "refuse",
            f"cannot read the installed packages: {f.dpkg_error}",
            fix="run on the node itself, an Ubuntu system where dpkg-query works",
        )
    broken = [p.name for p in f.packages if p.broken]
    if broken:
        return InstallPlan(
            "refuse",
            f"packages are left half-installed: {', '.join(broken)}",
            fix="sudo dpkg --configure -a && sudo apt-get -f install, then run this again",
        )
    if f.module_loaded and b.branch is None:
        version = f.loaded_version or "unknown version"
        if wanted is None:
            return InstallPlan(
                "nothing",
                f"a driver not installed from packages is loaded ({version}); left as it is",
            )
        return InstallPlan(
            "refuse",
            f"a driver not installed from packages is loaded ({version}); gpud does not replace it",
            fix="uninstall it (nvidia-uninstall for a .run install), reboot, then run "
            f"sudo gpudctl driver install --branch {wanted}",
        )
    if b.branch is not None and wanted is not None and not _matches(status, wanted):
        c = choose(candidates or (), wanted)
        state = "installed and loaded" if f.module_loaded else "installed"
        return InstallPlan(
            "refuse",
            f"driver {flavour(b.branch, b.server, b.open)} is {state}; gpud does not remove a "
            f"driver to install {wanted}",
            candidate=c,
            fix=f"to replace it by hand: {_manual_replace(status, c, wanted)}",
        )
    if b.branch is not None:
        installed_as = Candidate("", b.branch, b.server, b.open, None)
        names = _installed_names(f.packages)
        complete = (
            any(m in names for m in meta_packages(installed_as))
            and utils_package(installed_as) in names
            and (b.signed_prebuilt or b.dkms)
        )
        if f.module_loaded and not status.reboot_required:
            if complete:
                return InstallPlan(
                    "nothing", f"driver {installed_as.flavour} ({b.installed_version}) is loaded"
                )
        elif complete:
            return InstallPlan(
                "nothing",
                f"driver {installed_as.flavour} is installed but not running yet",
                reboot_required=True,
                reboot_reasons=status.reboot_reasons
                or ("the installed module is not loaded until the node reboots",),
            )
        # Installed but incomplete (nvidia-smi or the modules for this kernel missing):
        # installing the same branch again only adds what is missing.
        wanted = wanted or WantedBranch(b.branch, b.server, b.open)
    if candidates is None:
        return InstallPlan(
            "refuse",
            "ubuntu-drivers is not installed",
            fix="sudo apt-get install -y ubuntu-drivers-common",
        )
    if not candidates:
        return InstallPlan(
            "refuse",
            "no NVIDIA GPU found by ubuntu-drivers; `ubuntu-drivers list --gpgpu` lists no driver",
            fix="check the GPU is visible (lspci -nn | grep -i nvidia; a VM needs it passed "
            "through) and that apt knows the restricted component (sudo apt-get update)",
        )
    c = choose(candidates, wanted)
    if c is None:
        listed = ", ".join(x.flavour for x in candidates)
        return InstallPlan(
            "refuse",
            f"ubuntu-drivers offers no driver {wanted} for this GPU (it lists {listed})",
            fix="pass one of the listed branches with --branch",
        )
    return InstallPlan(
        "install",
        f"install driver {c.flavour}" + ("" if wanted else " (the newest server branch)"),
        candidate=c,
        commands=install_commands(c),
    )


def verify(status: DriverStatus, c: Candidate) -> tuple[bool, str | None, tuple[str, ...]]:
    """After installing: (the driver's packages are installed, the branch dpkg shows, notes)."""
    names = _installed_names(status.facts.packages)
    b = status.branch
    installed = b.branch
    notes = []
    ok = any(m in names for m in meta_packages(c))
    if ok and installed is not None and installed != c.branch:
        notes.append(
            f"asked for {c.flavour} but dpkg shows branch {installed} installed "
            f"({flavour(installed, b.server, b.open)}): {c.flavour} is a transitional package"
        )
    return ok, (flavour(installed, b.server, b.open) if installed else None), tuple(notes)


def after_install_reboot(status: DriverStatus) -> tuple[str, ...]:
    """Why the new driver is not running yet (empty when it is)."""
    f, b = status.facts, status.branch
    reasons = list(status.reboot_reasons)
    if not f.module_loaded:
        reasons.append("the new kernel module is not loaded: reboot (or sudo modprobe nvidia)")
    if f.secure_boot == "enabled" and b.dkms and not b.signed_prebuilt and not f.module_loaded:
        reasons.append(
            "Secure Boot is on and the modules are built by DKMS: enroll the MOK "
            "(sudo mokutil --import /var/lib/shim-signed/mok/MOK.der) and confirm it in "
            "MokManager during the reboot"
        )
    if f.nouveau_loaded:
        reasons.append("nouveau is loaded and holds the GPUs until the reboot")
    return tuple(dict.fromkeys(reasons))


# --- effects ----------------------------------------------------------------------------------


def list_candidates(run: CommandRunner) -> tuple[tuple[Candidate, ...] | None, str]:
    """Candidates (None when ubuntu-drivers is missing) and its stderr, for messages."""
    result = run(list(LIST_ARGV), 120.0)
    if missing(result):
        return None, result.stderr
    return parse_candidates(result.stdout), result.stderr


def _tail(*texts: str) -> str:
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    return "\n".join(lines[-_TAIL_LINES:])


def _driver_packages(status: DriverStatus) -> tuple[str, ...]:
    return tuple(p.name for p in status.facts.packages if p.installed)


def write_state(root: Path, data: dict[str, Any]) -> Path:
    path = under(root, STATE_DIR) / STATE_FILE
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    return path


def install_driver(
    root: Path = Path("/"),
    wanted: WantedBranch | None = None,
    *,
    pinned: str | None = None,
    dry_run: bool = False,
    run: CommandRunner = run_command,
    now: float | None = None,
) -> InstallResult:
    """Plan, run and verify; ``pinned`` is the config's branch, used when ``wanted`` is None.

    The caller checks root (``dry_run`` needs none). The state file is written whenever a
    command was run, failures included, so the next bootstrap knows what was tried.
    """
    if wanted is None and pinned:
        wanted = parse_wanted(pinned)
    before = driver_status(root, run)
    candidates, list_err = list_candidates(run)
    plan = plan_install(before, wanted, candidates)
    requested = plan.candidate.flavour if plan.candidate else (str(wanted) if wanted else None)
    if plan.action == "refuse":
        return InstallResult(
            "refused",
            plan.reason,
            requested,
            commands=tuple(" ".join(c) for c in plan.commands),
            fix=plan.fix,
            output_tail=_tail(list_err) or None,
            plan=plan,
        )
    b = before.branch
    current = flavour(b.branch, b.server, b.open) if b.branch else None
    if plan.action == "nothing":
        return InstallResult(
            "reboot-required" if plan.reboot_required else "already-installed",
            ("already installed: " if not plan.reboot_required else "")
            + plan.reason
            + ("; reboot required" if plan.reboot_required else ""),
            requested,
            current,
            _driver_packages(before),
            plan.reboot_required,
            plan.reboot_reasons,
            plan=plan,
        )
    assert plan.candidate is not None
    commands = tuple(" ".join(c) for c in plan.commands)
    if dry_run:
        return InstallResult(
            "dry-run",
            f"would {plan.reason}; nothing was changed",
            requested,
            current,
            commands=commands,
            plan=plan,
        )
    result = _execute(root, plan, plan.candidate, run)
    state = {
        "requested_branch": requested,
        "installed_branch": result.installed_branch,
        "packages": list(result.packages),
        "result": result.result,
        "reboot_required": result.reboot_required,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "commands": list(result.commands),
    }
    path = write_state(root, state)
    return replace(result, requested_branch=requested, state_file=str(path))


def _execute(root: Path, plan: InstallPlan, c: Candidate, run: CommandRunner) -> InstallResult:
    drivers_argv, utils_argv = plan.commands
    done = (" ".join(drivers_argv),)
    ud = run(drivers_argv, INSTALL_TIMEOUT)
    mid = driver_status(root, run)
    ok, installed, notes = verify(mid, c)
    if not ok:
        hint = "ubuntu-drivers ran but installed nothing"
        if missing(ud):
            hint = "ubuntu-drivers is not installed"
        elif ud.returncode != 0:
            hint = f"ubuntu-drivers failed (exit {ud.returncode})"
        return InstallResult(
            "failed",
            f"{hint}: no {' or '.join(meta_packages(c))} in dpkg afterwards",
            installed_branch=installed,
            packages=_driver_packages(mid),
            commands=done,
            fix="read its output below; a held apt lock (another apt running) or a kernel "
            "without prebuilt modules (ubuntu-drivers then needs --include-dkms) are common; "
            f"try by hand: sudo ubuntu-drivers install --gpgpu nvidia:{c.flavour}",
            output_tail=_tail(ud.stdout, ud.stderr) or "(no output)",
            plan=plan,
        )
    apt = run(utils_argv, INSTALL_TIMEOUT)
    done += (" ".join(utils_argv),)
    after = driver_status(root, run)
    ok, installed, notes = verify(after, c)
    utils = utils_package(c)
    if apt.returncode != 0 or utils not in _installed_names(after.facts.packages):
        tail = _tail(apt.stdout, apt.stderr) or "(no output)"
        lock = "Could not get lock" in tail or "is held by process" in tail
        return InstallResult(
            "failed",
            f"apt-get install {utils} failed (exit {apt.returncode}): "
            + (tail.splitlines()[-1] if tail else ""),
            installed_branch=installed,
            packages=_driver_packages(after),
            commands=done,
            fix=(
                "another apt or unattended-upgrades holds the dpkg lock: wait for it, then run "
                "this again"
                if lock
                else f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {utils}"
            ),
            notes=notes,
            output_tail=tail,
            plan=plan,
        )
    reboot = after_install_reboot(after)
    if reboot:
        return InstallResult(
            "reboot-required",
            f"driver {installed} installed; reboot required before it runs",
            installed_branch=installed,
            packages=_driver_packages(after),
            reboot_required=True,
            reboot_reasons=reboot,
            commands=done,
            notes=notes,
            plan=plan,
        )
    return InstallResult(
        "installed",
        f"driver {installed} installed and loaded ({after.facts.loaded_version})",
        installed_branch=installed,
        packages=_driver_packages(after),
        commands=done,
        notes=notes,
        plan=plan,
    )
