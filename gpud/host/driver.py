"""Is the NVIDIA driver installed, loaded, and the one installed? (``gpudctl driver status``)

A GPU node's driver can be wrong in ways no single tool shows: packages installed but the module
not loaded until a reboot, a new branch installed while the old module still runs, nouveau
holding the GPU, DKMS-built modules the kernel refuses under Secure Boot. ``ubuntu-drivers``'
exit codes say none of this (they are 0 almost always), so gpud collects the facts itself —
files under a root prefix and four commands (``dpkg-query``, ``mokutil``, ``systemctl``) run
through a :data:`~gpud.host.commands.CommandRunner` — and derives the problems with a pure
function, each with the command that fixes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.host.commands import CommandRunner, missing, run_command
from gpud.host.platform import under

# Package families whose names carry the branch; ubuntu-drivers --gpgpu installs the headless
# metapackage and the prebuilt modules but not nvidia-driver-<branch>, so all are asked for.
DPKG_PATTERNS = (
    "nvidia-driver-*",
    "nvidia-headless-*",
    "nvidia-dkms-*",
    "nvidia-utils-*",
    "nvidia-compute-utils-*",
    "linux-modules-nvidia-*",
)
DPKG_FORMAT = "${Package} ${Version} ${db:Status-Abbrev}\n"

_FLAGS = r"(?P<branch>\d+)(?P<server>-server)?(?P<open>-open)?"
_META = re.compile(rf"^(?:nvidia-driver|nvidia-headless(?:-no-dkms)?)-{_FLAGS}$")
_DKMS = re.compile(rf"^nvidia-dkms-{_FLAGS}$")
_UTILS = re.compile(r"^nvidia-(?:compute-)?utils-(?P<branch>\d+)(?P<server>-server)?$")
_MODULES = re.compile(rf"^linux-modules-nvidia-{_FLAGS}-(?P<kernel>.+)$")
_LOADED = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)")
_BLACKLIST = re.compile(r"^\s*blacklist\s+nouveau\s*(?:#.*)?$", re.MULTILINE)
_MODPROBE_DIRS = ("/etc/modprobe.d", "/lib/modprobe.d", "/usr/lib/modprobe.d")
# The certificate DKMS signs modules with: Ubuntu's (update-secureboot-policy --new-key makes it,
# Ubuntu's dkms is configured to sign with it), then Debian's dkms default.
MOK_KEYS = ("/var/lib/shim-signed/mok/MOK.der", "/var/lib/dkms/mok.pub")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    status: str
    """dpkg's ``db:Status-Abbrev`` without the trailing blank, e.g. ``ii``, ``iU``, ``rc``."""

    @property
    def installed(self) -> bool:
        # Second letter is the current state; W/t are installed with triggers pending.
        return len(self.status) > 1 and self.status[1] in "iWt"

    @property
    def broken(self) -> bool:
        """Unpacked or half-configured: dpkg stopped in the middle (``dpkg --configure -a``)."""
        return (len(self.status) > 1 and self.status[1] in "UFH") or self.status.endswith("R")


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str


@dataclass(frozen=True)
class DriverFacts:
    """What was collected, before any judgement; :func:`problems` is a pure function of it."""

    module_loaded: bool
    loaded_version: str | None
    nvml_version: str | None
    kernel: str | None
    packages: tuple[Package, ...]
    dpkg_error: str | None
    nouveau_loaded: bool
    nouveau_blacklisted: bool
    secure_boot: str
    """``enabled``, ``disabled`` or ``unknown`` (mokutil missing or unanswerable)."""
    persistenced: str
    """``systemctl is-active``'s word (``active``, ``inactive``, ``failed``…) or ``unknown``."""
    reboot_required_pkgs: tuple[str, ...] | None
    """``/var/run/reboot-required.pkgs`` when a reboot is pending, else None."""
    notes: tuple[str, ...] = ()
    mok_key: str = "unchecked"
    """DKMS's signing certificate as shim knows it (``mokutil --test-key``), looked at only with
    Secure Boot on: ``enrolled``, ``pending`` (imported, waiting for MokManager at the next boot),
    ``not-enrolled``, ``absent`` (no certificate: the modules are unsigned), ``unknown``; else
    ``unchecked``."""
    mok_key_path: str = MOK_KEYS[0]


@dataclass(frozen=True)
class Branch:
    branch: str | None
    server: bool
    open: bool
    installed_version: str | None
    signed_prebuilt: bool
    dkms: bool
    branches: tuple[str, ...]


@dataclass(frozen=True)
class DriverStatus:
    facts: DriverFacts
    branch: Branch
    reboot_reasons: tuple[str, ...]
    problems: tuple[Problem, ...] = field(default=())

    @property
    def reboot_required(self) -> bool:
        return bool(self.reboot_reasons)

    @property
    def mok_steps(self) -> tuple[str, ...]:
        """What the operator must do before the modules can load (empty when nothing)."""
        return mok_steps(self.facts, self.branch)

    def as_dict(self) -> dict[str, Any]:
        """The stable JSON form of ``gpudctl driver status -o json``.

        Keys: ``module_loaded`` (bool), ``loaded_version`` (str|null, from
        /proc/driver/nvidia/version), ``installed_version`` (str|null, upstream version of the
        installed driver packages), ``nvml_version`` (str|null, when a caller saw NVML),
        ``kernel`` (running kernel), ``packages`` ([{name, version, status}], status as dpkg's
        two-letter abbreviation), ``branch`` (str|null), ``branches`` (every branch found),
        ``server``, ``open``, ``signed_prebuilt`` (Canonical's signed modules for the running
        kernel installed), ``dkms``, ``nouveau_loaded``, ``nouveau_blacklisted``,
        ``secure_boot`` (enabled|disabled|unknown), ``mok_key`` (enrolled|pending|not-enrolled|
        absent|unknown|unchecked: DKMS's signing certificate, looked at with Secure Boot on),
        ``mok_key_path``, ``mok_enrollment_required`` (bool: the modules cannot load until
        that certificate is enrolled, a reboot alone does not help), ``mok_steps`` ([str]),
        ``persistenced`` (systemctl's word or unknown), ``reboot_required`` (bool),
        ``reboot_reasons`` ([str]), ``problems`` ([{what, fix}]), ``notes`` ([str], e.g. what
        could not be read without root).
        """
        f, b = self.facts, self.branch
        return {
            "module_loaded": f.module_loaded,
            "loaded_version": f.loaded_version,
            "installed_version": b.installed_version,
            "nvml_version": f.nvml_version,
            "kernel": f.kernel,
            "packages": [
                {"name": p.name, "version": p.version, "status": p.status} for p in f.packages
            ],
            "branch": b.branch,
            "branches": list(b.branches),
            "server": b.server,
            "open": b.open,
            "signed_prebuilt": b.signed_prebuilt,
            "dkms": b.dkms,
            "nouveau_loaded": f.nouveau_loaded,
            "nouveau_blacklisted": f.nouveau_blacklisted,
            "secure_boot": f.secure_boot,
            "mok_key": f.mok_key,
            "mok_key_path": f.mok_key_path,
            "mok_enrollment_required": bool(self.mok_steps),
            "mok_steps": list(self.mok_steps),
            "persistenced": f.persistenced,
            "reboot_required": self.reboot_required,
            "reboot_reasons": list(self.reboot_reasons),
            "problems": [{"what": p.what, "fix": p.fix} for p in self.problems],
            "notes": list(f.notes),
        }


# --- parsing (pure) ---------------------------------------------------------------------------


def parse_loaded_version(text: str) -> str | None:
    """The version in ``/proc/driver/nvidia/version``'s NVRM line (proprietary or open module)."""
    m = _LOADED.search(text)
    return m.group(1) if m else None


def parse_dpkg(stdout: str) -> tuple[Package, ...]:
    """Lines of ``DPKG_FORMAT``; packages dpkg only knows of (status ``un``, no version) dropped."""
    packages = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            name, version, status = parts
        elif len(parts) == 2:  # no version: known to dpkg but not installed
            name, version, status = parts[0], "", parts[1]
        else:
            continue
        if status.startswith("un") or status[1:2] == "n":
            continue
        packages.append(Package(name, version, status))
    return tuple(packages)


def parse_secure_boot(result_stdout: str, result_stderr: str, returncode: int) -> str:
    """``mokutil --sb-state``: "SecureBoot enabled|disabled"; no EFI means no Secure Boot."""
    text = f"{result_stdout}\n{result_stderr}"
    if returncode == 127:
        return "unknown"
    if "validation is disabled" in text:  # shim told not to enforce (mokutil --disable-validation)
        return "disabled"
    if "SecureBoot enabled" in text:
        return "enabled"
    if "SecureBoot disabled" in text or "not supported" in text:
        return "disabled"
    return "unknown"


def parse_mok_test(stdout: str, stderr: str) -> str:
    """``mokutil --test-key FILE``: its words, not its exit status (which differs between
    mokutil versions for the same answer).

    "is already enrolled", "is already in db" and "already in the built-in trusted keyring" mean
    the kernel trusts it; "is already in the enrollment request" that ``mokutil --import`` ran
    and MokManager asks at the next boot; "is not enrolled" that nobody asked yet.
    """
    text = f"{stdout}\n{stderr}"
    if "is not enrolled" in text:
        return "not-enrolled"
    if "in the enrollment request" in text:
        return "pending"
    if any(w in text for w in ("is already enrolled", "is already in db", "trusted keyring")):
        return "enrolled"
    return "unknown"


def mok_steps(facts: DriverFacts, branch: Branch) -> tuple[str, ...]:
    """The operator's steps when Secure Boot refuses DKMS-built modules; () when it does not.

    Only an operator at the console can enroll a key (that is what makes Secure Boot mean
    something), so these are steps to report, never to run, and a reboot without them only
    boots into a node whose driver does not load.
    """
    blocked = (
        facts.secure_boot == "enabled"
        and branch.dkms
        and not branch.signed_prebuilt
        and not facts.module_loaded
        and facts.mok_key != "enrolled"
    )
    if not blocked:
        return ()
    key = facts.mok_key_path
    steps: list[str] = []
    if facts.mok_key == "absent":
        dkms = f"nvidia-dkms-{_pkg_suffix(branch)}"
        steps += [
            "create DKMS's signing key: sudo update-secureboot-policy --new-key",
            f"rebuild the modules so DKMS signs them: sudo dpkg-reconfigure {dkms}",
        ]
    if facts.mok_key != "pending":
        steps.append(f"sudo mokutil --import {key} (it asks for a one-time password)")
    steps.append(
        "reboot at the console (or a BMC/serial console): before the OS starts, the blue "
        "MokManager screen waits 10 seconds for a key; choose Enroll MOK, Continue, Yes, type "
        "that password, then Reboot"
    )
    return tuple(steps)


def upstream_version(debian_version: str) -> str:
    """``1:550.120-0ubuntu0.24.04.1`` → ``550.120``: the part NVRM reports."""
    return debian_version.split(":", 1)[-1].split("-", 1)[0].split("+", 1)[0]


def branch_of(packages: tuple[Package, ...], kernel: str | None) -> Branch:
    """The driver branch from package names, most telling family first.

    The metapackage (nvidia-driver-/nvidia-headless-) names what the operator chose; DKMS, the
    prebuilt modules and the utils follow it. Transitional packages can pull a newer branch
    than the one asked for, so every branch present is reported and the highest of the most
    telling family wins.
    """
    installed = [p for p in packages if p.installed]
    families: list[list[tuple[int, re.Match[str], Package]]] = [[], [], [], []]
    for p in installed:
        for rank, rx in enumerate((_META, _DKMS, _MODULES, _UTILS)):
            m = rx.match(p.name)
            if m:
                families[rank].append((int(m.group("branch")), m, p))
                break
    all_branches = sorted({str(n) for fam in families for n, _, _ in fam}, key=int)
    chosen = next((max(fam, key=lambda t: t[0]) for fam in families if fam), None)
    if chosen is None:
        return Branch(None, False, False, None, False, False, ())
    number, m, _ = chosen
    server = bool(m.group("server"))
    is_open = "open" in m.groupdict() and bool(m.group("open"))
    version = next(
        (
            upstream_version(p.version)
            for fam in (families[0], families[1], families[3])
            for n, _, p in fam
            if n == number and p.version
        ),
        None,
    )
    signed = any(n == number and mm.group("kernel") == kernel for n, mm, _ in families[2] if kernel)
    dkms = bool(families[1])
    return Branch(str(number), server, is_open, version, signed, dkms, tuple(all_branches))


def reboot_reasons(facts: DriverFacts, branch: Branch) -> tuple[str, ...]:
    reasons = []
    nvidia_pkgs = [p for p in facts.reboot_required_pkgs or () if "nvidia" in p]
    if nvidia_pkgs:
        reasons.append(f"/var/run/reboot-required lists {', '.join(nvidia_pkgs)}")
    if (
        facts.loaded_version
        and branch.installed_version
        and facts.loaded_version != branch.installed_version
    ):
        reasons.append(
            f"installed driver {branch.installed_version} but the loaded module is "
            f"{facts.loaded_version}"
        )
    return tuple(reasons)


def _pkg_suffix(branch: Branch) -> str:
    return f"{branch.branch}{'-server' if branch.server else ''}{'-open' if branch.open else ''}"


def problems(facts: DriverFacts, branch: Branch, reboot: tuple[str, ...]) -> tuple[Problem, ...]:
    """Everything wrong, each with its fix, in the order an operator should deal with them."""
    out: list[Problem] = []
    if facts.dpkg_error:
        out.append(
            Problem(
                f"cannot list the installed packages: {facts.dpkg_error}",
                "run gpudctl on the node itself, where dpkg-query works (Debian or Ubuntu)",
            )
        )
    broken = [p.name for p in facts.packages if p.broken]
    if broken:
        out.append(
            Problem(
                f"packages left half-installed: {', '.join(broken)}",
                "sudo dpkg --configure -a && sudo apt-get -f install",
            )
        )
    if branch.branch is None and not facts.dpkg_error:
        if facts.module_loaded:
            pass  # a .run or container-installed driver: working, not gpud's to manage
        else:
            out.append(
                Problem("no NVIDIA driver package is installed", "sudo gpudctl driver install")
            )
    if len(branch.branches) > 1:
        out.append(
            Problem(
                f"several driver branches are installed: {', '.join(branch.branches)}",
                f"keep one: remove the packages of the branches other than {branch.branch}",
            )
        )
    if facts.nouveau_loaded:
        if facts.nouveau_blacklisted:
            fix = "nouveau is blacklisted but still loaded: sudo update-initramfs -u, then reboot"
        else:
            fix = (
                "printf 'blacklist nouveau\\noptions nouveau modeset=0\\n' | sudo tee "
                "/etc/modprobe.d/blacklist-nouveau.conf && sudo update-initramfs -u, then reboot"
            )
        out.append(Problem("the nouveau driver is loaded and holds the GPUs", fix))
    mok = mok_steps(facts, branch)
    sb_blocks = bool(mok)
    if sb_blocks:
        why = {
            "absent": f"and DKMS has no signing key ({facts.mok_key_path} is missing)",
            "pending": "and their signing key waits for MokManager at the console",
        }.get(facts.mok_key, "signed by a key the kernel does not trust yet (MOK not enrolled)")
        out.append(
            Problem(
                f"Secure Boot is on and the NVIDIA modules are built by DKMS, {why}",
                "install Canonical's signed modules if this kernel has them: sudo apt-get "
                f"install linux-modules-nvidia-{_pkg_suffix(branch)}-"
                f"{facts.kernel or '$(uname -r)'}; or enroll DKMS's key: "
                + "; ".join(f"{i}. {step}" for i, step in enumerate(mok, 1)),
            )
        )
    no_modules = (
        branch.branch is not None
        and not branch.dkms
        and not branch.signed_prebuilt
        and not facts.module_loaded
    )
    if no_modules:
        out.append(
            Problem(
                f"no NVIDIA kernel modules are installed for the running kernel {facts.kernel}",
                "sudo apt-get install "
                f"linux-modules-nvidia-{_pkg_suffix(branch)}-{facts.kernel or '$(uname -r)'}",
            )
        )
    if branch.branch is not None and not facts.module_loaded and not (sb_blocks or no_modules):
        if reboot:
            fix = f"reboot ({'; '.join(reboot)})"
        elif facts.nouveau_loaded:
            fix = "reboot once nouveau is blacklisted"
        else:
            fix = "sudo modprobe nvidia (dmesg says why if it fails), or reboot"
        out.append(
            Problem(f"driver {branch.branch} is installed but its module is not loaded", fix)
        )
    mismatch = (
        facts.loaded_version
        and branch.installed_version
        and facts.loaded_version != branch.installed_version
    )
    if mismatch:
        out.append(
            Problem(
                f"installed {branch.installed_version} but the running module is "
                f"{facts.loaded_version} (NVML fails: driver/library version mismatch)",
                "reboot, or when nothing uses the GPUs: sudo rmmod nvidia_uvm nvidia_drm "
                "nvidia_modeset nvidia && sudo modprobe nvidia",
            )
        )
    if facts.module_loaded and facts.persistenced in ("inactive", "failed"):
        out.append(
            Problem(
                f"nvidia-persistenced is {facts.persistenced}: every NVML call re-initialises "
                "the GPUs",
                "sudo systemctl enable --now nvidia-persistenced",
            )
        )
    return tuple(out)


# --- collection (effects) ---------------------------------------------------------------------


def _read(path: Path, notes: list[str], label: str) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except PermissionError:
        notes.append(f"cannot read {label} without root: run as root to know")
    except OSError:
        pass
    return None


def _blacklisted(root: Path, notes: list[str]) -> bool:
    for d in _MODPROBE_DIRS:
        for conf in sorted(under(root, d).glob("*.conf")):
            text = _read(conf, notes, f"{d}/{conf.name}")
            if text and _BLACKLIST.search(text):
                return True
    cmdline = _read(under(root, "/proc/cmdline"), notes, "/proc/cmdline") or ""
    return any(
        w.startswith("modprobe.blacklist=") and "nouveau" in w.split("=", 1)[1].split(",")
        for w in cmdline.split()
    )


def _dpkg(run: CommandRunner) -> tuple[tuple[Package, ...], str | None]:
    result = run(["dpkg-query", "-W", "-f", DPKG_FORMAT, *DPKG_PATTERNS], 30.0)
    if missing(result):
        return (), "dpkg-query not found (not a Debian or Ubuntu system?)"
    # Exit 1 with "no packages found matching" per unmatched pattern is normal; anything else
    # on stderr with a failure is a real error (a locked or damaged dpkg database).
    other = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "no packages found matching" not in line
    ]
    if result.returncode not in (0, 1) or (result.returncode == 1 and other):
        detail = "; ".join(other) or f"exit status {result.returncode}"
        return parse_dpkg(result.stdout), f"dpkg-query failed: {detail}"
    return parse_dpkg(result.stdout), None


def _mok_key(root: Path, run: CommandRunner) -> tuple[str, str]:
    """(state, path) of DKMS's signing certificate; ``absent`` when none of MOK_KEYS exists."""
    path = next((k for k in MOK_KEYS if under(root, k).is_file()), None)
    if path is None:
        return "absent", MOK_KEYS[0]
    result = run(["mokutil", "--test-key", str(under(root, path))], 10.0)
    return parse_mok_test(result.stdout, result.stderr), path


def _persistenced(run: CommandRunner) -> str:
    result = run(["systemctl", "is-active", "nvidia-persistenced"], 10.0)
    word = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    known = ("active", "inactive", "failed", "activating", "deactivating", "reloading")
    return word if word in known else "unknown"


def collect(root: Path, run: CommandRunner, nvml_version: str | None = None) -> DriverFacts:
    """Read the files and run the commands; no judgement here."""
    notes: list[str] = []
    proc_version = _read(
        under(root, "/proc/driver/nvidia/version"), notes, "/proc/driver/nvidia/version"
    )
    loaded = proc_version is not None or under(root, "/sys/module/nvidia").is_dir()
    kernel = (_read(under(root, "/proc/sys/kernel/osrelease"), notes, "osrelease") or "").strip()
    packages, dpkg_error = _dpkg(run)
    sb = run(["mokutil", "--sb-state"], 10.0)
    secure_boot = parse_secure_boot(sb.stdout, sb.stderr, sb.returncode)
    if secure_boot == "unknown":
        notes.append(
            "Secure Boot state unknown: mokutil is not installed"
            if missing(sb)
            else f"Secure Boot state unknown: mokutil said {(sb.stderr or sb.stdout).strip()!r}"
        )
    mok_key, mok_key_path = "unchecked", MOK_KEYS[0]
    if secure_boot == "enabled":
        mok_key, mok_key_path = _mok_key(root, run)
    reboot_pkgs: tuple[str, ...] | None = None
    for base in ("/var/run", "/run"):
        if under(root, f"{base}/reboot-required").exists():
            listed = _read(under(root, f"{base}/reboot-required.pkgs"), notes, "reboot-required")
            reboot_pkgs = tuple(dict.fromkeys((listed or "").split()))
            if not any("nvidia" in p for p in reboot_pkgs):
                notes.append("a reboot is pending for packages other than the NVIDIA driver")
            break
    return DriverFacts(
        module_loaded=loaded,
        loaded_version=parse_loaded_version(proc_version or ""),
        nvml_version=nvml_version,
        kernel=kernel or None,
        packages=packages,
        dpkg_error=dpkg_error,
        nouveau_loaded=under(root, "/sys/module/nouveau").is_dir(),
        nouveau_blacklisted=_blacklisted(root, notes),
        secure_boot=secure_boot,
        persistenced=_persistenced(run),
        reboot_required_pkgs=reboot_pkgs,
        notes=tuple(notes),
        mok_key=mok_key,
        mok_key_path=mok_key_path,
    )


def judge(facts: DriverFacts) -> DriverStatus:
    """The pure half: branch, reboot reasons and problems from the collected facts."""
    branch = branch_of(facts.packages, facts.kernel)
    reboot = reboot_reasons(facts, branch)
    return DriverStatus(facts, branch, reboot, problems(facts, branch, reboot))


def driver_status(
    root: Path = Path("/"), run: CommandRunner = run_command, nvml_version: str | None = None
) -> DriverStatus:
    """The driver as this node has it; ``nvml_version`` is what the daemon's backend saw, if any."""
    return judge(collect(root, run, nvml_version))
