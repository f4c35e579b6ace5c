"""Another program named ``gpud`` on the node, found before it is mistaken for this one.

Lepton AI's GPUd (github.com/leptonai/gpud) is a different daemon with the same name. Its
installer puts its binary in ``/usr/local/bin/gpud`` (``/usr/sbin/gpud`` in older releases) and
writes ``/etc/systemd/system/gpud.service``. A unit in ``/etc`` replaces the package's
``gpud.service`` (in ``/lib`` or ``/usr/lib``) outright, so ``systemctl start gpud`` would start
the other daemon; and ``/usr/local/bin`` and ``/usr/sbin`` come before ``/usr/bin`` on root's
``PATH`` and on sudo's ``secure_path``, so ``sudo gpud bootstrap`` would run the other binary.
Nothing of that fails loudly, so the package's postinst runs this module and stops configuring
(apt reports it, gpud.service is not started), and ``gpudctl doctor`` reports the same finding.

What is *not* a conflict: an operator's own copy of our unit in ``/etc`` whose ExecStart runs
``/usr/bin/gpud``, a masked unit (a link to ``/dev/null``: the operator's decision), and a
symlink that leads to ``/usr/bin/gpud``. Links are followed inside the root being examined, never
out of it, so a fake root (tests, ``GPUD_ROOT``, a chroot) is judged as the node would be.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gpud.host.platform import under

OUR_BINARY = "/usr/bin/gpud"
UNIT = "/etc/systemd/system/gpud.service"
# The head of root's PATH and sudo's secure_path on Ubuntu, and systemd's search path for an
# ExecStart that is not absolute: a gpud in any directory before /usr/bin wins over ours.
_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin")
SHADOWING_BINARIES = tuple(f"{d}/gpud" for d in _SEARCH_PATH[:-1])

FINISH_INSTALL = "sudo dpkg --configure -a"

_MASKED = PurePosixPath("/dev/null")
_MAX_LINKS = 40  # what the kernel allows in one lookup (ELOOP)
_EXEC_PREFIXES = "-@:+!|"  # systemd.service(5): flags in front of the path, not part of it


@dataclass(frozen=True)
class Conflict:
    path: str
    """Where it was found, as the node names it (the root stripped)."""
    why: str
    steps: tuple[str, ...]
    """Commands that remove it, in order; :func:`fix_steps` merges several conflicts' steps."""


# --- pure parsing -------------------------------------------------------------------------------


def _logical_lines(text: str) -> Iterable[str]:
    """Unit-file lines with backslash continuations joined and comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def exec_start_executables(unit_text: str) -> tuple[str, ...]:
    """The executables of the ``[Service]`` ExecStart= commands systemd would run, in order.

    An empty ``ExecStart=`` drops the commands before it (how an override replaces the
    command), so only what follows the last one counts. A command whose words cannot be split
    still yields its first whitespace-separated word: it is judged rather than ignored.
    """
    section = ""
    executables: list[str] = []
    for line in _logical_lines(unit_text):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        if section != "Service" or not sep or key.strip() != "ExecStart":
            continue
        command = value.strip().lstrip(_EXEC_PREFIXES)
        if not command:
            executables.clear()
            continue
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        if words:
            executables.append(words[0])
    return tuple(executables)


# --- reading the root ---------------------------------------------------------------------------


def resolve_in_root(root: Path, path: str | PurePosixPath) -> PurePosixPath | None:
    """``path`` with every symlink followed as the node under ``root`` follows it.

    An absolute link target starts again at ``root`` and ``..`` stops there, so nothing outside
    the root is ever looked at. Missing parts are kept as written (like ``realpath -m``). None for
    a link loop.
    """
    pending = list(PurePosixPath(path).parts[1:])
    done = PurePosixPath("/")
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            done = done.parent
            continue
        candidate = done / part
        on_disk = under(root, candidate)
        if not on_disk.is_symlink():
            done = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        target = PurePosixPath(os.readlink(on_disk))
        if target.is_absolute():
            done = PurePosixPath("/")
            pending[:0] = target.parts[1:]
        else:
            pending[:0] = target.parts
    return done


def _present(root: Path, path: str) -> bool:
    on_disk = under(root, path)
    return on_disk.is_symlink() or on_disk.exists()


def _systemd_lookup(root: Path, executable: str) -> str:
    """An ExecStart executable as systemd finds it: absolute as is, a bare name in its fixed
    search path (the first directory holding it), else as written."""
    if executable.startswith("/"):
        return executable
    for directory in _SEARCH_PATH:
        candidate = f"{directory}/{executable}"
        if _present(root, candidate):
            return candidate
    return executable


def _is_ours(root: Path, path: str) -> bool:
    ours = resolve_in_root(root, OUR_BINARY)
    return ours is not None and path.startswith("/") and resolve_in_root(root, path) == ours


def _unit_conflict(root: Path) -> Conflict | None:
    if not _present(root, UNIT):
        return None
    target = resolve_in_root(root, UNIT)
    if target == _MASKED:
        return None
    # disable while the file is still there (it removes the unit's wants link), reload after
    steps = (
        "sudo systemctl disable --now gpud.service",
        f"sudo rm {UNIT}",
        "sudo systemctl daemon-reload",
    )
    shadows = "a unit in /etc replaces the gpud package's gpud.service"
    try:
        text = under(root, target or UNIT).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Conflict(UNIT, f"cannot be read ({exc}); {shadows}", steps)
    executables = exec_start_executables(text)
    if not executables:
        return Conflict(UNIT, f"has no ExecStart=, so gpud cannot start; {shadows}", steps)
    foreign = [e for e in executables if not _is_ours(root, _systemd_lookup(root, e))]
    if not foreign:
        return None
    return Conflict(UNIT, f"its ExecStart runs {foreign[0]}, not {OUR_BINARY}; {shadows}", steps)


def _binary_conflicts(root: Path) -> list[Conflict]:
    return [
        Conflict(
            path,
            f"comes before {OUR_BINARY} on PATH: gpud in a shell, with or without sudo, runs it",
            (f"sudo rm {path}",),
        )
        for path in SHADOWING_BINARIES
        if _present(root, path) and not _is_ours(root, path)
    ]


def find_conflicts(root: Path = Path("/")) -> tuple[Conflict, ...]:
    """Every other ``gpud`` under ``root``: the unit first, so its steps stop the other daemon
    before its binary is removed. Reads only; changes nothing."""
    unit = _unit_conflict(root)
    return (*([unit] if unit else []), *_binary_conflicts(root))


def describe(conflicts: Iterable[Conflict]) -> str:
    """What was found, on one line: doctor's detail and bootstrap's step detail."""
    return "; ".join(f"{c.path}: {c.why}" for c in conflicts)


def fix_steps(conflicts: Iterable[Conflict]) -> tuple[str, ...]:
    """All the conflicts' steps in one runnable order, each command once."""
    return tuple(dict.fromkeys(step for c in conflicts for step in c.steps))


def postinst_message(conflicts: tuple[Conflict, ...]) -> str:
    """What apt shows when the package stops configuring: what was found, that gpud is not
    running, and the commands that get from here to a running gpud."""
    lines = [
        "gpud: another gpud is in the way (Lepton AI's GPUd, github.com/leptonai/gpud, "
        "installs files like these):"
    ]
    lines += [f"  {c.path}: {c.why}" for c in conflicts]
    lines += [
        "",
        "gpud was installed but not started: its service and commands would be the other's.",
        "Remove the other gpud:",
        *(f"  {step}" for step in fix_steps(conflicts)),
        "then finish gpud's configuration, which starts gpud.service:",
        f"  {FINISH_INSTALL}",
    ]
    return "\n".join(lines)


# --- the postinst's command ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Exit 0 in silence when there is no other gpud, else 1 with :func:`postinst_message`."""
    parser = argparse.ArgumentParser(
        prog="python -m gpud.host.conflicts",
        description="Find another program named gpud that would shadow this one; exit 1 if any.",
    )
    parser.add_argument(
        "--root", type=Path, help="the node's root directory (default: $GPUD_ROOT, else /)"
    )
    args = parser.parse_args(argv)
    root = args.root or Path(os.environ.get("GPUD_ROOT") or "/")
    if not root.is_dir():  # a mistyped root must not read as "no conflict"
        parser.error(f"{root}: not a directory (--root or GPUD_ROOT)")
    conflicts = find_conflicts(root)
    if not conflicts:
        return 0
    print(postinst_message(conflicts), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
