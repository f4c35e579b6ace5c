"""Installing nvidia-container-toolkit with apt, and reporting the toolkit's state on a node.

Why this is careful: apt's and dpkg's exit codes say whether a command ran, not whether the
package is usable (a post-install script can fail after apt printed success, a held package is
silently skipped), so the result is always read back from dpkg. Which repository a node trusts
is the operator's decision: gpud adds NVIDIA's apt source only when ``toolkit.aptSource`` says
so, and never without a ``signed-by`` keyring. Decisions (:func:`plan`, :func:`source_line`,
:func:`judge_status`) are pure; the shells around them run commands through a
:data:`CommandRunner` and read files under a root prefix, so tests use fake tools and trees.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpud.atomic import write_atomic
from gpud.host.commands import CommandRunner, missing, run_command
from gpud.host.locks import (
    DEFAULT_TIMEOUT,
    LOCKED,
    apt_lock_option,
    lock_fix,
    run_when_unlocked,
)
from gpud.host.platform import under

if TYPE_CHECKING:
    from gpud.host.containerd_imports import Merged

PACKAGE = "nvidia-container-toolkit"
LIST_FILE = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
LIST_MODE = 0o644
BINARIES = ("nvidia-ctk", "nvidia-container-runtime")
CDI_SPECS = ("/var/run/cdi/nvidia.yaml", "/etc/cdi/nvidia.yaml")
DPKG_FORMAT = "${Version} ${db:Status-Abbrev}\n"
# NVIDIA's documented layout (install guide), as an example for the error message only.
NVIDIA_EXAMPLE_SOURCE = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /"
NVIDIA_EXAMPLE_KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"

_CANDIDATE = re.compile(r"^\s*Candidate:\s*(\S+)\s*$", re.MULTILINE)
_OPTIONS = re.compile(r"^(deb(?:-src)?)\s+\[([^\]]*)\]\s+(.*)$")


class InstallError(RuntimeError):
    """The install could not be done or verified; ``fix`` says what the operator can do."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix


# --- pure decisions -----------------------------------------------------------------------------


def parse_dpkg_version(stdout: str) -> str | None:
    """``dpkg-query -W -f DPKG_FORMAT PACKAGE``: the version when installed (``?i?``), else None."""
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[1]) > 1 and parts[1][1] in "iWt":
            return parts[0]
    return None


def parse_candidate(policy_stdout: str) -> str | None:
    """``apt-cache policy PACKAGE``: the candidate version; None for ``(none)`` or no output.

    apt prints nothing at all (exit 0) for a package no source knows, and ``Candidate: (none)``
    for one it knows of but cannot install.
    """
    match = _CANDIDATE.search(policy_stdout)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def source_line(apt_source: str, keyring: Path | None) -> str:
    """The list-file line for ``toolkit.aptSource``, always with ``signed-by``.

    A bare URL is a flat repository like NVIDIA's (``deb [signed-by=K] URL /``); a deb line gets
    ``signed-by`` added to its options. A line that already names a keyring keeps it, unless it
    differs from ``keyring``. Raises :class:`InstallError` when no keyring is known: an unsigned
    source would let anyone on the path to the mirror choose what runs as root.
    """
    line = apt_source.strip()
    if not line.startswith(("deb ", "deb\t", "deb [")):
        # A bare URL is a flat repository ("URL /"); "URL SUITE COMPONENT" is used as given.
        line = f"deb {line} /" if " " not in line else f"deb {line}"
    match = _OPTIONS.match(line)
    head, options, rest = match.groups() if match else ("deb", "", line[3:].strip())
    opts = options.split()
    named = [o.split("=", 1)[1] for o in opts if o.startswith("signed-by=")]
    if keyring is not None:
        if named and named != [str(keyring)]:
            raise InstallError(
                f"toolkit.aptSource names signed-by={named[0]} but toolkit.keyring is {keyring}",
                "set one keyring: remove signed-by from toolkit.aptSource or make them equal",
            )
        if not named:
            opts.append(f"signed-by={keyring}")
    elif not named:
        raise InstallError(
            "toolkit.aptSource is set but toolkit.keyring is not (an unsigned source is refused)",
            f"set toolkit.keyring to the repository's keyring (NVIDIA's: {NVIDIA_EXAMPLE_KEYRING})",
        )
    return f"{head} [{' '.join(opts)}] {rest}"


def no_source_error() -> InstallError:
    """apt does not know the package and the operator configured no source: say how to add one."""
    return InstallError(
        f"{PACKAGE} is not available from any configured apt source",
        "set toolkit.aptSource and toolkit.keyring in /etc/gpud/gpud.yaml, e.g. NVIDIA's "
        f"repository: toolkit.aptSource: '{NVIDIA_EXAMPLE_SOURCE}' and toolkit.keyring: "
        f"{NVIDIA_EXAMPLE_KEYRING} (the keyring file must exist; NVIDIA's install guide shows "
        "how to fetch it), or add the source yourself and run 'apt-get update'",
    )


def plan(installed: str | None, candidate: str | None, line: str | None) -> tuple[str, ...]:
    """The steps to run: ``()`` when installed; ``add-source`` and ``update`` only when needed.

    Raises :class:`InstallError` when the package cannot be found and no source is configured.
    """
    if installed is not None:
        return ()
    if candidate is not None:
        return ("install",)
    if line is None:
        raise no_source_error()
    return ("add-source", "update", "install")


@dataclass(frozen=True)
class InstallResult:
    version: str | None
    already_installed: bool
    steps: tuple[str, ...]
    dry_run: bool = False
    list_file: str | None = None
    source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "package": PACKAGE,
            "version": self.version,
            "already_installed": self.already_installed,
            "steps": list(self.steps),
            "dry_run": self.dry_run,
            "list_file": self.list_file,
            "source": self.source,
        }


# --- shells -------------------------------------------------------------------------------------


def installed_version(run: CommandRunner) -> str | None:
    """The installed version per dpkg; InstallError when dpkg itself cannot answer."""
    result = run(["dpkg-query", "-W", "-f", DPKG_FORMAT, PACKAGE], 30.0)
    if missing(result):
        raise InstallError("dpkg-query not found", "run gpudctl on a Debian or Ubuntu node")
    if result.returncode not in (0, 1):  # 1: no package matched, the normal "not installed"
        raise InstallError(f"dpkg-query failed: {_detail(result.stderr, result.stdout)}")
    return parse_dpkg_version(result.stdout)


def install_toolkit(
    run: CommandRunner = run_command,
    root: Path = Path("/"),
    apt_source: str | None = None,
    keyring: Path | None = None,
    dry_run: bool = False,
    lock_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str], None] = lambda line: None,
) -> InstallResult:
    """Install nvidia-container-toolkit when dpkg says it is missing; verify through dpkg.

    The list file is written only when apt has no candidate, and is put back as it was (removed,
    or its old text restored) when ``apt-get update`` or the install then fails, so a failed run
    leaves no source behind that the operator did not get a working package from. Each apt-get
    waits up to ``lock_timeout`` seconds for the dpkg/apt locks (``progress`` hears who holds
    them) instead of failing on the first "Could not get lock".
    """
    version = installed_version(run)
    if version is not None:
        return InstallResult(version, True, ())
    candidate = _candidate(run)
    line = None
    if candidate is None and apt_source:
        line = source_line(apt_source, keyring)
        if keyring is not None and not under(root, str(keyring)).is_file():
            raise InstallError(
                f"toolkit.keyring {keyring} does not exist",
                f"put the repository's signing key there (NVIDIA's: {NVIDIA_EXAMPLE_KEYRING})",
            )
    steps = plan(None, candidate, line)
    list_path = under(root, LIST_FILE)
    base = InstallResult(None, False, steps, dry_run, LIST_FILE if line else None, line)
    if dry_run:
        return base

    previous = list_path.read_bytes() if list_path.exists() else None
    try:
        if "add-source" in steps:
            write_atomic(list_path, f"{line}\n".encode(), LIST_MODE)
            list_path.chmod(LIST_MODE)
        wait = apt_lock_option(lock_timeout)
        if "update" in steps:
            _apt(run, root, ["apt-get", "update", *wait], 300.0, lock_timeout, progress)
            if _candidate(run) is None:
                raise InstallError(
                    f"apt-get update succeeded but {PACKAGE} is still not available from {line}",
                    "check toolkit.aptSource (URL, suite, architecture) and toolkit.keyring",
                )
        _apt(
            run,
            root,
            ["apt-get", "install", "-y", *wait, "-o", "Dpkg::Options::=--force-confold", PACKAGE],
            900.0,
            lock_timeout,
            progress,
        )
        version = installed_version(run)
        if version is None:
            raise InstallError(
                f"apt-get reported success but dpkg does not list {PACKAGE} as installed",
                f"run 'apt-get install {PACKAGE}' by hand and read its output",
            )
    except BaseException:
        if "add-source" in steps:
            _restore(list_path, previous)
        raise
    return InstallResult(version, False, steps, False, base.list_file, line)


def _candidate(run: CommandRunner) -> str | None:
    result = run(["apt-cache", "policy", PACKAGE], 60.0)
    if missing(result):
        raise InstallError("apt-cache not found", "run gpudctl on a Debian or Ubuntu node")
    if result.returncode != 0:
        raise InstallError(f"apt-cache policy failed: {_detail(result.stderr, result.stdout)}")
    return parse_candidate(result.stdout)


def _apt(
    run: CommandRunner,
    root: Path,
    argv: list[str],
    timeout: float,
    lock_timeout: float,
    progress: Callable[[str], None],
) -> None:
    """Run apt-get once the locks are free (``argv`` has apt's own wait for a lock taken
    meanwhile, ``DPkg::Lock::Timeout``)."""
    result, holder = run_when_unlocked(run, argv, timeout, root, lock_timeout, progress)
    if holder is not None:
        verb = " ".join(argv[:2])
        ran = "did not run" if result.returncode == LOCKED else "gave up"
        raise InstallError(
            f"'{verb}' {ran}: {holder.path} is still held by {holder} after {lock_timeout:g} s",
            lock_fix(holder),
        )
    if result.returncode != 0:
        raise InstallError(
            f"'{' '.join(argv)}' failed (exit {result.returncode}): "
            f"{_detail(result.stderr, result.stdout)}",
            "fix the apt problem above and run 'gpudctl toolkit install' again",
        )


def _restore(path: Path, previous: bytes | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, previous, LIST_MODE)


def _detail(stderr: str, stdout: str) -> str:
    lines = [line for line in (stderr or stdout).strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:]) if lines else "(no output)"


# --- status -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str


@dataclass(frozen=True)
class ToolkitStatus:
    version: str | None
    package_error: str | None
    binaries: dict[str, str | None]
    config: str
    config_exists: bool
    config_error: str | None
    runtime_configured: bool | None
    default_runtime: bool | None
    cdi_enabled: bool | None
    cdi_specs: dict[str, dict[str, Any]]
    problems: tuple[Problem, ...] = field(default=())
    effective: dict[str, Any] | None = None
    """What containerd runs, each setting with the file that sets it (see ``effective_dict``)."""
    judged_by: str = ""
    """Whose rules applied, and whether containerd's own config dump confirmed them."""
    config_problems: tuple[str, ...] = ()
    """Why containerd does not load what the files say (imports, versions, disagreements)."""
    notes: tuple[str, ...] = ()
    unmet: tuple[str, ...] = ()
    """How the runtime containerd runs differs from what ``toolkit configure`` sets up."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "package": {
                "name": PACKAGE,
                "installed": self.version is not None,
                "version": self.version,
                "error": self.package_error,
            },
            "binaries": dict(self.binaries),
            "containerd": {
                "config": self.config,
                "exists": self.config_exists,
                "error": self.config_error,
                "nvidia_runtime": self.runtime_configured,
                "default_runtime": self.default_runtime,
                "enable_cdi": self.cdi_enabled,
                "judged_by": self.judged_by,
                "effective": self.effective,
                "problems": list(self.config_problems),
                "unmet": list(self.unmet),
                "notes": list(self.notes),
            },
            "cdi": self.cdi_specs,
            "problems": [{"message": p.message, "fix": p.fix} for p in self.problems],
        }


def effective_dict(merged: Merged) -> dict[str, Any]:
    """A :class:`gpud.host.containerd_imports.Merged` as data: every setting containerd runs
    with the file that sets it (None: containerd's own default)."""
    return {
        "files": list(merged.files),
        "nvidia_runtime": merged.runtime.value is not None,
        "runtime_file": merged.runtime.source,
        "binary_name": merged.binary.value,
        "binary_name_file": merged.binary.source,
        "default_runtime_name": merged.default_name,
        "default_runtime_file": merged.default.source,
        "enable_cdi": merged.cdi.value,
        "enable_cdi_file": merged.cdi.source,
        "overrides": list(merged.overrides),
    }


def judge_status(s: ToolkitStatus) -> tuple[Problem, ...]:
    """What is wrong, each with the command that fixes it."""
    out: list[Problem] = []
    if s.package_error:
        out.append(Problem(s.package_error, "run gpudctl on a Debian or Ubuntu node"))
    elif s.version is None:
        out.append(Problem(f"{PACKAGE} is not installed", "sudo gpudctl toolkit install"))
    for name, where in s.binaries.items():
        if where is None and s.version is not None:
            out.append(
                Problem(
                    f"{name} not found on PATH or in /usr/bin",
                    f"sudo apt-get install --reinstall {PACKAGE}",
                )
            )
    if s.config_error:
        out.append(Problem(f"{s.config}: {s.config_error}", f"fix {s.config} (it is not valid)"))
    elif not s.config_exists:
        out.append(
            Problem(
                f"{s.config} does not exist",
                "install containerd, then sudo gpudctl toolkit configure",
            )
        )
    else:
        for problem in s.config_problems:
            out.append(Problem(problem, f"fix the containerd config ({s.config} and its imports)"))
        if not s.runtime_configured:
            out.append(Problem(_not_configured(s), "sudo gpudctl toolkit configure"))
    for path, spec in s.cdi_specs.items():
        if spec.get("error"):
            out.append(Problem(f"{path}: {spec['error']}", "sudo gpudctl toolkit cdi"))
    if s.cdi_enabled and not any(spec["exists"] for spec in s.cdi_specs.values()):
        out.append(
            Problem("enable_cdi is on but there is no NVIDIA CDI spec", "sudo gpudctl toolkit cdi")
        )
    return tuple(out)


def _not_configured(s: ToolkitStatus) -> str:
    eff = s.effective or {}
    files = eff.get("files") or [s.config]
    where = s.config if len(files) == 1 else f"{s.config} with its imports ({', '.join(files[1:])})"
    why = "; ".join([*s.unmet, *(eff.get("overrides") or [])])
    return f"the nvidia runtime is not configured in {where}" + (f": {why}" if why else "")


def toolkit_status(root: Path = Path("/"), run: CommandRunner = run_command) -> ToolkitStatus:
    """Collect the toolkit's state on the node under ``root`` and judge it."""
    from gpud.host.cdi import read_spec
    from gpud.host.containerd_dump import installed
    from gpud.host.platform import discover
    from gpud.host.toolkit import inspect

    package_error = None
    try:
        version = installed_version(run)
    except InstallError as exc:
        version, package_error = None, str(exc)
    binaries = {name: _find_binary(root, name) for name in BINARIES}

    platform = discover(root, run)
    config = platform.containerd_config
    containerd = installed(root, platform.flavour)
    report = inspect(platform.resolve(config), root, containerd)
    effective = effective_dict(report.merged) if report.merged is not None else None

    specs = {}
    for spec_path in CDI_SPECS:
        specs[spec_path] = read_spec(under(root, spec_path))
    status = ToolkitStatus(
        version,
        package_error,
        binaries,
        str(config),
        report.exists,
        report.error,
        report.configured,
        report.default,
        report.cdi,
        specs,
        effective=effective,
        judged_by=report.judged_by,
        config_problems=report.problems,
        notes=report.notes,
        unmet=report.unmet,
    )
    return replace(status, problems=judge_status(status))


def _find_binary(root: Path, name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = under(root, f"/usr/bin/{name}")
    return f"/usr/bin/{name}" if candidate.is_file() and os.access(candidate, os.X_OK) else None
