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

Three things on real nodes are said rather than hit: the dpkg lock (unattended-upgrades on a new
node) is waited for, bounded, naming its holder (:mod:`gpud.host.locks`); a kernel for which
Canonical ships no prebuilt modules makes ubuntu-drivers print, on stdout, that DKMS is needed
and list nothing, which is reported as such with ``--include-dkms`` as the way on; and DKMS-built
modules under Secure Boot need their signing key enrolled (MOK) at the console, which is
reported as the next step instead of a reboot that would not load them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpud.atomic import write_atomic
from gpud.host.commands import CommandRunner, missing, run_command
from gpud.host.driver import DriverStatus, Package, driver_status
from gpud.host.locks import (
    DEFAULT_TIMEOUT,
    LOCKED,
    Holder,
    apt_lock_option,
    lock_fix,
    run_when_unlocked,
)
from gpud.host.platform import under

LIST_ARGV = ("ubuntu-drivers", "list", "--gpgpu")
INCLUDE_DKMS = "--include-dkms"
STATE_DIR = "/var/lib/gpud"
STATE_FILE = "driver.json"
# argv[0] absolute: the runner takes no environment, and env(1) then finds apt-get on PATH.
NONINTERACTIVE = ("/usr/bin/env", "DEBIAN_FRONTEND=noninteractive")
INSTALL_TIMEOUT = 1800.0
_TAIL_LINES = 15

_CANDIDATE = re.compile(r"^nvidia-driver-(?P<branch>\d+)(?P<server>-server)?(?P<open>-open)?$")
_MODULES_BY = re.compile(r"\(kernel modules provided by (?P<modules>[^)\s]+)\)")
_WANTED = re.compile(r"^(?:nvidia:)?(?P<branch>\d+)(?P<server>-server)?(?P<open>-open)?$")
# ubuntu-drivers' kerneldetection: printed on stdout instead of any driver (exit status 0) when
# the running kernel has no prebuilt modules in the archive; "(None)" when it found no kernel
# metapackage at all.
_NEEDS_DKMS = re.compile(r"^Your running kernel \([^)]*\) requires DKMS modules.*$", re.MULTILINE)
_OUTDATED = re.compile(r"^Warning: Your running kernel .* is outdated\..*$", re.MULTILINE)


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
class Listing:
    """What ``ubuntu-drivers list --gpgpu`` said: the drivers, and why there may be none."""

    candidates: tuple[Candidate, ...]
    needs_dkms: str | None = None
    """ubuntu-drivers' own sentence when the running kernel has no prebuilt modules."""
    warnings: tuple[str, ...] = ()


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
    needs_dkms: bool = False
    """Refused because the running kernel has no prebuilt modules (``--include-dkms``)."""

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
    """``already-installed``, ``installed``, ``reboot-required``, ``mok-enrollment-required``,
    ``dry-run``, ``refused`` or ``failed``; only the last two are failures (exit 1)."""
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
    mok_steps: tuple[str, ...] = ()
    lock_holder: str | None = None
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
        ``reboot_reasons``, ``mok_enrollment_required`` (bool: Secure Boot refuses the
        DKMS-built modules until their key is enrolled at the console; a reboot alone does not
        load them), ``mok_steps`` (the operator's steps, in order), ``commands`` (run, or that
        would run with --dry-run), ``fix``, ``notes``, ``output_tail`` (the tools' last lines
        on failure), ``lock_holder`` (the process that kept the dpkg lock, e.g.
        ``unattended-upgr (pid 812)``, when the wait for it ran out), ``state_file``.
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
            "mok_enrollment_required": bool(self.mok_steps),
            "mok_steps": list(self.mok_steps),
            "commands": list(self.commands),
            "fix": self.fix,
            "notes": list(self.notes),
            "output_tail": self.output_tail,
            "lock_holder": self.lock_holder,
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


def parse_listing(stdout: str) -> Listing:
    """``ubuntu-drivers list --gpgpu [--include-dkms]``'s stdout, kept whole: drivers, and the
    sentences it prints instead of them (a kernel that needs DKMS, an outdated kernel)."""
    needs = _NEEDS_DKMS.search(stdout)
    return Listing(
        parse_candidates(stdout),
        needs.group(0).strip() if needs else None,
        tuple(m.group(0).strip() for m in _OUTDATED.finditer(stdout)),
    )


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


def install_commands(
    c: Candidate, include_dkms: bool = False, lock_timeout: float = DEFAULT_TIMEOUT
) -> tuple[tuple[str, ...], ...]:
    """ubuntu-drivers has no lock timeout of its own (gpud waits before it); apt-get gets one."""
    dkms = (INCLUDE_DKMS,) if include_dkms else ()
    return (
        (*NONINTERACTIVE, "ubuntu-drivers", "install", "--gpgpu", *dkms, f"nvidia:{c.flavour}"),
        (
            *NONINTERACTIVE,
            "apt-get",
            "install",
            "-y",
            *apt_lock_option(lock_timeout),
            utils_package(c),
        ),
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
    *,
    needs_dkms: str | None = None,
    include_dkms: bool = False,
    lock_timeout: float = DEFAULT_TIMEOUT,
) -> InstallPlan:
    """What ``driver install`` should do; ``candidates`` None when ubuntu-drivers is missing,
    ``needs_dkms`` what shows that it listed nothing because the running kernel has no prebuilt
    modules (:func:`dkms_evidence`).

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
    if not candidates and needs_dkms and not include_dkms:
        kernel = status.facts.kernel or "the running kernel"
        secure = (
            " Secure Boot is on: DKMS-built modules then load only once their signing key is "
            "enrolled at the console (MOK), which the install reports."
            if status.facts.secure_boot == "enabled"
            else ""
        )
        return InstallPlan(
            "refuse",
            f"Canonical ships no prebuilt NVIDIA modules for the running kernel {kernel}, so "
            f"ubuntu-drivers offers only modules built here by DKMS and lists nothing without "
            f"--include-dkms ({needs_dkms})",
            fix="build them with DKMS: sudo gpudctl driver install --include-dkms (gpud "
            "bootstrap: driver.includeDkms: true in /etc/gpud/gpud.yaml); or boot an Ubuntu "
            "kernel with prebuilt modules (e.g. linux-generic) and run this again." + secure,
            needs_dkms=True,
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
        f"install driver {c.flavour}"
        + ("" if wanted else " (the newest server branch)")
        + (" with DKMS-built modules" if include_dkms else ""),
        candidate=c,
        commands=install_commands(c, include_dkms, lock_timeout),
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
    f = status.facts
    reasons = list(status.reboot_reasons)
    if not f.module_loaded:
        reasons.append("the new kernel module is not loaded: reboot (or sudo modprobe nvidia)")
    if status.mok_steps:
        reasons.append(
            "Secure Boot is on and the modules are built by DKMS: the reboot loads them only "
            f"once {f.mok_key_path} is enrolled (MOK; see mok_steps)"
        )
    if f.nouveau_loaded:
        reasons.append("nouveau is loaded and holds the GPUs until the reboot")
    return tuple(dict.fromkeys(reasons))


# --- effects ----------------------------------------------------------------------------------


def dkms_evidence(listing: Listing | None, with_dkms: Listing | None) -> str | None:
    """Why an empty listing means "this kernel needs DKMS": ubuntu-drivers' own sentence, or
    the drivers it lists once asked with ``--include-dkms``; None when nothing says so."""
    if listing is not None and listing.needs_dkms:
        return f'ubuntu-drivers says "{listing.needs_dkms}"'
    if with_dkms is not None and with_dkms.candidates:
        names = ", ".join(c.package for c in with_dkms.candidates)
        return f"with --include-dkms it lists {names}"
    return None


def list_candidates(run: CommandRunner, include_dkms: bool = False) -> tuple[Listing | None, str]:
    """What ubuntu-drivers lists (None when it is missing) and its stderr, for messages."""
    result = run([*LIST_ARGV, *((INCLUDE_DKMS,) if include_dkms else ())], 120.0)
    if missing(result):
        return None, result.stderr
    return parse_listing(result.stdout), result.stderr


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
    include_dkms: bool = False,
    dry_run: bool = False,
    run: CommandRunner = run_command,
    now: float | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str], None] = lambda line: None,
) -> InstallResult:
    """Plan, run and verify; ``pinned`` is the config's branch, used when ``wanted`` is None.

    ``lock_timeout`` bounds each wait for the dpkg/apt locks; ``progress`` hears who holds one
    while gpud waits. The caller checks root (``dry_run`` needs none). The state file is
    written whenever a command was run, failures included, so the next bootstrap knows what
    was tried.
    """
    if wanted is None and pinned:
        wanted = parse_wanted(pinned)
    before = driver_status(root, run)
    listing, list_err = list_candidates(run, include_dkms)
    with_dkms = None
    if listing is not None and not listing.candidates and not include_dkms:
        # Without the sentence, an empty list can still mean "DKMS only": newer ubuntu-drivers
        # silently leave out the drivers whose modules only DKMS provides. Asking again says.
        with_dkms, _ = list_candidates(run, include_dkms=True)
    plan = plan_install(
        before,
        wanted,
        listing.candidates if listing is not None else None,
        needs_dkms=dkms_evidence(listing, with_dkms),
        include_dkms=include_dkms,
        lock_timeout=lock_timeout,
    )
    listed_notes = listing.warnings if listing is not None else ()
    requested = plan.candidate.flavour if plan.candidate else (str(wanted) if wanted else None)
    if plan.action == "refuse":
        return InstallResult(
            "refused",
            plan.reason,
            requested,
            commands=tuple(" ".join(c) for c in plan.commands),
            fix=plan.fix,
            notes=listed_notes,
            output_tail=_tail(list_err) or None,
            plan=plan,
        )
    b = before.branch
    current = flavour(b.branch, b.server, b.open) if b.branch else None
    if plan.action == "nothing":
        if before.mok_steps:
            return replace(_mok_result(before, current, plan, (), ()), requested_branch=requested)
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
            notes=listed_notes,
            plan=plan,
        )
    result = _execute(root, plan, plan.candidate, run, lock_timeout, progress)
    state = {
        "requested_branch": requested,
        "installed_branch": result.installed_branch,
        "packages": list(result.packages),
        "result": result.result,
        "reboot_required": result.reboot_required,
        "mok_enrollment_required": bool(result.mok_steps),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "commands": list(result.commands),
    }
    path = write_state(root, state)
    return replace(
        result,
        requested_branch=requested,
        notes=listed_notes + result.notes,
        state_file=str(path),
    )


def _mok_result(
    status: DriverStatus,
    installed: str | None,
    plan: InstallPlan,
    commands: tuple[str, ...],
    notes: tuple[str, ...],
) -> InstallResult:
    """Installed, but Secure Boot will refuse the modules until the operator enrolls the key."""
    f = status.facts
    why = {
        "absent": "DKMS has no signing key, so they are unsigned",
        "pending": "their signing key is queued and waits for MokManager at the console",
    }.get(f.mok_key, f"their signing key {f.mok_key_path} is not enrolled")
    return InstallResult(
        "mok-enrollment-required",
        f"driver {installed} is installed, but Secure Boot refuses its DKMS-built modules: {why}. "
        "A reboot alone does not load them; enroll the key (mok_steps), which ends with the reboot",
        installed_branch=installed,
        packages=_driver_packages(status),
        reboot_required=True,
        reboot_reasons=after_install_reboot(status),
        commands=commands,
        notes=notes,
        mok_steps=status.mok_steps,
        plan=plan,
    )


def _lock_failed(
    what: str, holder: Holder, lock_timeout: float, commands: tuple[str, ...], plan: InstallPlan
) -> InstallResult:
    return InstallResult(
        "failed",
        f"{what} did not run: {holder.path} is still held by {holder} after {lock_timeout:g} s",
        commands=commands,
        fix=lock_fix(holder),
        lock_holder=str(holder),
        plan=plan,
    )


def _execute(
    root: Path,
    plan: InstallPlan,
    c: Candidate,
    run: CommandRunner,
    lock_timeout: float,
    progress: Callable[[str], None],
) -> InstallResult:
    drivers_argv, utils_argv = plan.commands
    done = (" ".join(drivers_argv),)
    ud, holder = run_when_unlocked(run, drivers_argv, INSTALL_TIMEOUT, root, lock_timeout, progress)
    if ud.returncode == LOCKED and holder is not None:
        return _lock_failed("ubuntu-drivers install", holder, lock_timeout, (), plan)
    mid = driver_status(root, run)
    ok, installed, notes = verify(mid, c)
    if not ok:
        hint = "ubuntu-drivers ran but installed nothing"
        if missing(ud):
            hint = "ubuntu-drivers is not installed"
        elif holder is not None:
            hint = f"ubuntu-drivers lost the dpkg lock to {holder}"
        elif ud.returncode != 0:
            hint = f"ubuntu-drivers failed (exit {ud.returncode})"
        listing = parse_listing(ud.stdout)
        fix = (
            "read its output below; a kernel without prebuilt modules (ubuntu-drivers then "
            "needs --include-dkms) is common; try by hand: sudo ubuntu-drivers install --gpgpu "
            f"nvidia:{c.flavour}"
        )
        if listing.needs_dkms:
            fix = "run it with --include-dkms (ubuntu-drivers: " + listing.needs_dkms + ")"
        elif holder is not None:
            fix = lock_fix(holder)
        return InstallResult(
            "failed",
            f"{hint}: no {' or '.join(meta_packages(c))} in dpkg afterwards",
            installed_branch=installed,
            packages=_driver_packages(mid),
            commands=done,
            fix=fix,
            output_tail=_tail(ud.stdout, ud.stderr) or "(no output)",
            lock_holder=str(holder) if holder else None,
            plan=plan,
        )
    apt, holder = run_when_unlocked(run, utils_argv, INSTALL_TIMEOUT, root, lock_timeout, progress)
    utils = utils_package(c)
    if apt.returncode == LOCKED and holder is not None:
        return _lock_failed(f"apt-get install {utils}", holder, lock_timeout, done, plan)
    done += (" ".join(utils_argv),)
    after = driver_status(root, run)
    ok, installed, notes = verify(after, c)
    if apt.returncode != 0 or utils not in _installed_names(after.facts.packages):
        tail = _tail(apt.stdout, apt.stderr) or "(no output)"
        return InstallResult(
            "failed",
            f"apt-get install {utils} failed (exit {apt.returncode}): "
            + (tail.splitlines()[-1] if tail else ""),
            installed_branch=installed,
            packages=_driver_packages(after),
            commands=done,
            fix=(
                f"{holder} kept the dpkg lock: {lock_fix(holder)}"
                if holder is not None
                else f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {utils}"
            ),
            notes=notes,
            output_tail=tail,
            lock_holder=str(holder) if holder else None,
            plan=plan,
        )
    if after.mok_steps:
        return _mok_result(after, installed, plan, done, notes)
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
