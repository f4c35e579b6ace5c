"""Applying :func:`gpud.host.containerd.configure` to a real file: the effectful shell.

Everything that touches the host is here and small: read the config, back it up, write the new
text atomically, restart containerd. The rules that keep an operator's node safe:

- nothing is written (no backup, no restart) when the config is already configured;
- the original goes to ``<file>.gpud-backup-<UTC time>`` with the same mode and owner, so a
  0600 file holding registry credentials never gets a readable copy;
- the new file replaces the old atomically (a crash leaves one or the other) and keeps its mode
  and owner; a symlinked config is written where the link points;
- restart is a callable the caller passes (``systemctl restart containerd`` or
  ``snap restart microk8s.daemon-containerd``); ``systemctl daemon-reload`` is never run (it makes
  running containers lose their GPUs, and no unit changed).
"""

from __future__ import annotations

import difflib
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from gpud.host.containerd import ConfigError, RuntimeOptions, configure

MICROK8S_TEMPLATE = "var/snap/microk8s/current/args/containerd-template.toml"
CONTAINERD_CONFIG = "etc/containerd/config.toml"
MICROK8S_RESTART = ("snap", "restart", "microk8s.daemon-containerd")
CONTAINERD_RESTART = ("systemctl", "restart", "containerd")
NEW_FILE_MODE = 0o644


class RestartError(RuntimeError):
    """The restart command is missing or failed; the message says which and how."""


@dataclass(frozen=True)
class Target:
    """The config file to edit and how to make containerd read it again."""

    path: Path
    platform: str  # "microk8s" or "containerd"
    restart_argv: tuple[str, ...]


@dataclass(frozen=True)
class Result:
    path: Path
    changed: bool
    version: int
    created: bool = False
    backup: Path | None = None
    restarted: bool = False
    restart_error: str | None = None
    notes: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    diff: str = ""


def detect_target(root: Path = Path("/")) -> Target:
    """Which containerd config this node uses, looked up under ``root`` (tests pass a fake tree).

    A stopgap until platform discovery (gpud.host.platform) owns this decision: MicroK8s'
    template when the snap or the template is there (MicroK8s regenerates containerd.toml from it
    on every start, so that is the file to edit), else containerd's standard config.
    """
    template = root / MICROK8S_TEMPLATE
    if (root / "snap/microk8s").exists() or template.exists():
        return Target(template, "microk8s", MICROK8S_RESTART)
    return Target(root / CONTAINERD_CONFIG, "containerd", CONTAINERD_RESTART)


def target_for(path: Path) -> Target:
    """An explicit ``--config``: MicroK8s' when it is a containerd-template.toml."""
    if path.name == "containerd-template.toml":
        return Target(path, "microk8s", MICROK8S_RESTART)
    return Target(path, "containerd", CONTAINERD_RESTART)


def command_restarter(argv: Sequence[str], timeout: float = 120.0) -> Callable[[], None]:
    """A restart callable that runs ``argv`` and raises :class:`RestartError` on any failure."""

    def restart() -> None:
        command = " ".join(argv)
        try:
            done = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise RestartError(f"{argv[0]} not found; cannot run '{command}'") from None
        except subprocess.TimeoutExpired:
            raise RestartError(f"'{command}' did not finish in {timeout:.0f}s") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            raise RestartError(f"'{command}' failed (exit {done.returncode}): {detail}")

    return restart


def configure_file(
    path: Path,
    options: RuntimeOptions | None = None,
    restart: Callable[[], None] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> Result:
    """Configure the NVIDIA runtime in the containerd config at ``path``.

    Raises :class:`ConfigError` (nothing written) when the file is not a config gpud can edit,
    and :class:`OSError` when it cannot be read or written. A failing restart does not raise: the
    config is written by then, so the result carries ``restart_error`` for the caller to report.
    """
    options = options or RuntimeOptions()
    target = path.resolve() if path.is_symlink() else path
    try:
        raw = target.read_bytes()
        existed = True
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise FileNotFoundError(
                f"{target.parent} does not exist; is containerd installed?"
            ) from None
        raw, existed = b"", False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc}") from None
    edit = configure(text, options)
    base = Result(
        path=path,
        changed=edit.changed,
        version=edit.version,
        notes=edit.notes,
        changes=edit.changes,
    )
    if not edit.changed:
        return base

    backup = None
    if existed:
        info = target.stat()
        mode, owner = info.st_mode & 0o7777, (info.st_uid, info.st_gid)
        backup = _backup(target, raw, mode, owner, now())
    else:
        mode, owner = NEW_FILE_MODE, None
    _write(target, edit.text.encode("utf-8"), mode, owner)
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            edit.text.splitlines(keepends=True),
            str(backup or "/dev/null"),
            str(path),
        )
    )
    result = Result(
        path=path,
        changed=True,
        version=edit.version,
        created=not existed,
        backup=backup,
        notes=edit.notes,
        changes=edit.changes,
        diff=diff,
    )
    if restart is None:
        return result
    try:
        restart()
    except RestartError as exc:
        return replace(result, restart_error=str(exc))
    return replace(result, restarted=True)


def _backup(path: Path, data: bytes, mode: int, owner: tuple[int, int], when: datetime) -> Path:
    """Copy the original beside it, created exclusively with the original's mode and owner."""
    stamp = when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(100):
        suffix = f".gpud-backup-{stamp}" + (f".{attempt}" if attempt else "")
        candidate = path.with_name(path.name + suffix)
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            _own(fd, mode, owner)
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            candidate.unlink(missing_ok=True)
            raise
        os.close(fd)
        return candidate
    raise FileExistsError(f"too many backups of {path} at {stamp}")


def _write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    """Atomic replace; the temporary file is 0600 until it has the final mode and owner."""
    temp = path.with_name(f".{path.name}.gpud.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _own(fd, mode, owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _own(fd: int, mode: int, owner: tuple[int, int] | None) -> None:
    # chown first: it may clear set-id bits, which fchmod then puts back exactly.
    if owner is not None and owner != (os.geteuid(), os.getegid()):
        os.fchown(fd, *owner)
    os.fchmod(fd, mode)
