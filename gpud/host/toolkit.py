"""Applying :func:`gpud.host.containerd.configure` to a real node: the effectful shell.

Everything that touches the host is here and small: read the config and every file it imports,
back up and write the one file that decides, check what containerd will load, restart it. The
rules that keep an operator's node safe:

- the file edited is the one that decides (:func:`gpud.host.containerd_imports.choose_target`):
  the top-level config, or the imported drop-in that overrides it (nvidia-ctk's 99-nvidia.toml,
  a registry-mirror drop-in that replaces the CRI table on containerd 1.x); where that is not
  safe, nothing is written and :class:`Refusal` names the file and why;
- nothing is written (no backup, no restart) when containerd already runs what was asked;
- before an edit, the installed containerd's ``config dump`` must agree with gpud's reading of
  the files; after it, both must show what was asked, or the file is put back as it was and
  :class:`VerifyError` says what containerd would have loaded instead;
- the original goes to ``<file>.gpud-backup-<UTC time>`` with the same mode and owner, so a
  0600 file holding registry credentials never gets a readable copy; the name never ends in
  ``.toml`` and is refused when an ``imports`` glob would load it; per file, the first backup
  (the file as it was before gpud) and the newest ones are kept, :data:`KEEP_BACKUPS` in all;
- the new file replaces the old atomically (a crash leaves one or the other) and keeps its mode
  and owner; a symlinked config is written where the link points;
- restart is a callable the caller passes (``systemctl restart containerd`` or
  ``snap restart microk8s.daemon-containerd``); ``systemctl daemon-reload`` is never run (it makes
  running containers lose their GPUs, and no unit changed).
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from gpud.host.containerd import ConfigError, RuntimeOptions, configure
from gpud.host.containerd_dump import DumpError, Installed, disagreements, dump
from gpud.host.containerd_imports import (
    Graph,
    Merged,
    Refusal,
    View,
    choose_target,
    load,
    merge,
    plausible,
    rules_for,
    unmet,
    would_import,
)

MICROK8S_RESTART = ("snap", "restart", "microk8s.daemon-containerd")
CONTAINERD_RESTART = ("systemctl", "restart", "containerd")
NEW_FILE_MODE = 0o644
KEEP_BACKUPS = 5
BACKUP_INFIX = ".gpud-backup-"
_BACKUP = re.compile(r"\.gpud-backup-(\d{8}T\d{6}Z)(?:\.(\d+))?")


class RestartError(RuntimeError):
    """The restart command is missing or failed; the message says which and how."""


class VerifyError(RuntimeError):
    """After the edit containerd would not run what was asked; the file was put back."""


@dataclass(frozen=True)
class Target:
    """The config file to edit and how to make containerd read it again."""

    path: Path
    platform: str  # "microk8s" or "containerd"
    restart_argv: tuple[str, ...]


@dataclass(frozen=True)
class Result:
    path: Path
    """The file gpud edited (or would have): the top-level config or one it imports."""
    changed: bool
    version: int
    created: bool = False
    backup: Path | None = None
    restarted: bool = False
    restart_error: str | None = None
    notes: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    diff: str = ""
    config: Path | None = None
    """The top-level config containerd is started with."""
    why: str = ""
    """Why :attr:`path` is the file to edit."""
    effective: Merged | None = None
    """What containerd runs afterwards, per gpud's reading of the files."""
    judged_by: str = ""
    """The containerd release whose rules applied, and whether its config dump confirmed it."""
    removed_backups: tuple[Path, ...] = field(default=())


def target_for(path: Path) -> Target:
    """An explicit ``--config`` (without it, :func:`gpud.host.platform.discover` decides):
    MicroK8s' when it is a containerd-template.toml."""
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


def view_of(path: Path, root: Path) -> tuple[View, str]:
    """The view imports resolve in, and ``path`` as containerd names it: under ``root`` when
    the config lies there (absolute imports then lie under the root too), else as it is."""
    path = Path(os.path.abspath(path))
    try:
        return View(root), "/" + str(path.relative_to(root.absolute()))
    except ValueError:
        return View(Path("/")), str(path)


@dataclass(frozen=True)
class _Node:
    """The config as containerd will load it: one graph per rule set that may apply."""

    graphs: tuple[Graph, ...]
    view: View
    config: Path
    containerd: Installed | None

    @property
    def dumpable(self) -> bool:
        """Whether ``config dump`` reads the same files: under a root prefix, an absolute
        import would be read from this machine's ``/`` instead of the root."""
        if self.containerd is None or self.containerd.release is None:
            return False
        if not self.graphs[0].top.exists:
            return False
        if self.view.root == Path("/"):
            return True
        return not any(
            str(i).startswith("/")
            for f in self.graphs[0].files
            for i in (f.data.get("imports") or [])
        )

    def judged_by(self, dumped: bool) -> str:
        if self.containerd is None or self.containerd.release is None:
            why = self.containerd.error if self.containerd else "no containerd binary to ask"
            families = " and ".join(g.rules.label for g in self.graphs)
            return f"the rules of {families} ({why})"
        how = "confirmed by its config dump" if dumped else "its rules (config dump not run)"
        return f"{self.containerd.label}: {how}"


def _read_node(path: Path, root: Path, containerd: Installed | None) -> _Node:
    view, top = view_of(path, root)
    release = containerd.release if containerd is not None else None
    graphs = tuple(load(top, view, rules) for rules in rules_for(release))
    return _Node(graphs if release else plausible(graphs), view, path, containerd)


def _dump_gaps(node: _Node, options: RuntimeOptions) -> list[str]:
    """The same check on containerd's own dump; [] when it cannot be run here."""
    if not node.dumpable or node.containerd is None:
        return []
    dumped = dump(node.containerd, node.config, node.view.root, options.runtime_name)
    label, name = node.containerd.label, options.runtime_name
    out = []
    if dumped.runtime is None:
        out.append(f"{label} (config dump) has no {name} runtime")
    elif dumped.binary != options.binary:
        out.append(f"{label} (config dump) runs {dumped.binary!r} as {name}")
    if options.set_as_default and (dumped.default or "runc") != name:
        out.append(f"{label} (config dump) has default runtime {dumped.default!r}")
    if options.enable_cdi and dumped.cdi is False:
        out.append(f"{label} (config dump) has enable_cdi = false")
    return out


def check_dump(node: _Node, runtime_name: str) -> bool:
    """Before an edit: containerd must load what gpud reads, else gpud would edit blind.

    Returns whether the dump ran; raises :class:`Refusal` on a disagreement and
    :class:`DumpError` when containerd cannot load the config at all.
    """
    if not node.dumpable or node.containerd is None:
        return False
    dumped = dump(node.containerd, node.config, node.view.root, runtime_name)
    merged = merge(node.graphs[0], runtime_name)
    differ = disagreements(merged, dumped, node.view, node.config, runtime_name)
    if differ:
        raise Refusal(
            f"{node.containerd.label}'s config dump differs from gpud's reading of "
            f"{', '.join(merged.files)}: {'; '.join(differ)}; not editing what gpud cannot "
            "predict (please report this)"
        )
    return True


@dataclass(frozen=True)
class Inspection:
    """What containerd will run, for ``gpudctl toolkit status`` and ``gpudctl doctor``."""

    exists: bool
    error: str | None = None
    """The top-level config cannot be read, or containerd cannot load the config."""
    merged: Merged | None = None
    configured: bool | None = None
    """``toolkit configure`` would change nothing and containerd runs the nvidia runtime."""
    default: bool | None = None
    cdi: bool | None = None
    judged_by: str = ""
    problems: tuple[str, ...] = ()
    """Why containerd does not load what the files say, or gpud and containerd disagree."""
    notes: tuple[str, ...] = ()
    unmet: tuple[str, ...] = ()
    """How the runtime containerd runs differs from the one ``toolkit configure`` sets up."""


def inspect(
    path: Path,
    root: Path = Path("/"),
    containerd: Installed | None = None,
    options: RuntimeOptions | None = None,
) -> Inspection:
    """Judge the config containerd is started with: merged with its imports, by the installed
    containerd's rules, and confirmed by its ``config dump`` where it can run. Never raises
    for a bad config: that is what it reports."""
    options = options or RuntimeOptions()
    name = options.runtime_name
    try:
        node = _read_node(path, root, containerd)
    except ConfigError as exc:
        return Inspection(True, str(exc))
    except UnicodeDecodeError as exc:
        return Inspection(True, f"not UTF-8 text: {exc}")
    except OSError as exc:
        return Inspection(path.exists(), f"cannot read: {exc.strerror or exc}")
    if not node.graphs[0].top.exists:
        return Inspection(False)
    views = [merge(graph, name) for graph in node.graphs]
    problems = list(dict.fromkeys(p for graph in node.graphs for p in graph.problems))
    notes = []
    dumped = None
    if node.dumpable and node.containerd is not None:
        try:
            dumped = dump(node.containerd, node.config, node.view.root, name)
        except DumpError as exc:
            return Inspection(True, str(exc), views[0], judged_by=node.judged_by(False))
        problems += disagreements(views[0], dumped, node.view, node.config, name)
    if len(views) > 1 and any(_facts(v) != _facts(views[0]) for v in views):
        problems.append(
            "containerd 1.x and 2.x would run different settings ("
            + "; ".join(f"{v.rules.label}: {_facts(v)}" for v in views)
            + "): which applies depends on the containerd installed"
        )
    try:
        target = choose_target(node.graphs, options)
        unchanged = not configure(
            target.file.text,
            target.options,
            inherit_version=target.inherit_version,
            effective=target.effective,
        ).changed
    except ConfigError:
        unchanged = False
    missing = list(dict.fromkeys(m for v in views for m in unmet(v, options)))
    configured = unchanged and not problems and not missing
    default = all(v.default_name == name for v in views)
    cdi_values = {v.cdi.value for v in views}
    cdi = cdi_values.pop() if len(cdi_values) == 1 else None  # 1.7 off, 2.x on by default
    if dumped is not None:
        configured = configured and dumped.runtime is not None and dumped.binary == options.binary
        default = default and (dumped.default or "runc") == name
        if dumped.cdi is not None:
            cdi = dumped.cdi
    if len(cdi_values) > 1:
        notes.append("enable_cdi is not set: off in containerd 1.7, on in 2.x")
    elif cdi is None:
        notes.append(f"{views[0].rules.label} has no enable_cdi setting: CDI needs containerd 1.7+")
        cdi = False
    return Inspection(
        True,
        None,
        views[0],
        configured,
        default,
        cdi,
        node.judged_by(dumped is not None),
        tuple(problems),
        tuple(notes),
        tuple(missing),
    )


def _facts(merged: Merged) -> str:
    runtime = merged.binary.value if merged.runtime.value is not None else "no nvidia runtime"
    return f"{runtime}, default {merged.default_name}"


def configure_file(
    path: Path,
    options: RuntimeOptions | None = None,
    restart: Callable[[], None] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    *,
    root: Path = Path("/"),
    containerd: Installed | None = None,
) -> Result:
    """Make containerd, started with the config at ``path``, run the NVIDIA runtime as asked.

    ``containerd`` is the installed binary (:func:`gpud.host.containerd_dump.installed`): its
    release picks the import rules and its ``config dump`` checks the result; without it the
    rules of both families must agree. ``root`` is where absolute imports lie.

    Raises :class:`ConfigError` (:class:`Refusal` among them; nothing written) when the config
    is not something gpud can edit safely, :class:`DumpError` when containerd cannot load it as
    it is, :class:`VerifyError` when the result was not what containerd would load (the file is
    put back), and :class:`OSError` when a file cannot be read or written. A failing restart does
    not raise: the config is written by then, so the result carries ``restart_error``.
    """
    options = options or RuntimeOptions()
    if not path.exists() and not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist; is containerd installed?")
    node = _read_node(path, root, containerd)
    target = choose_target(node.graphs, options)  # gpud's reading first: it says which rule
    dumped = check_dump(node, options.runtime_name)
    file = target.file
    try:
        edit = configure(
            file.text,
            target.options,
            inherit_version=target.inherit_version,
            effective=target.effective,
        )
    except ConfigError as exc:
        if file.via is None:
            raise
        raise ConfigError(f"{file.shown} (imported, it decides the CRI settings): {exc}") from None
    edited = file.path.resolve() if file.path.is_symlink() else file.path
    merged = merge(node.graphs[0], options.runtime_name)
    base = Result(
        path=edited if file.via is not None else path,
        changed=edit.changed,
        version=edit.version,
        notes=edit.notes,
        changes=edit.changes,
        config=path,
        why=target.why,
        effective=merged,
        judged_by=node.judged_by(dumped),
    )
    if not edit.changed:
        missing = [
            g for graph in node.graphs for g in unmet(merge(graph, options.runtime_name), options)
        ]
        if missing:
            raise Refusal(f"gpud would change nothing in {file.shown}, yet {'; '.join(missing)}")
        return base

    directory, base_name = posixpath.split(file.name)
    for beside in (
        f"{file.name}{BACKUP_INFIX}20000101T000000Z",
        posixpath.join(directory, f".{base_name}.gpud.0.0.tmp"),
    ):
        pattern = next((p for g in node.graphs if (p := would_import(g, beside))), None)
        if pattern is not None:
            raise Refusal(
                f"{file.shown} decides the CRI settings, but containerd imports every file "
                f"matching {View.shown(pattern)}: gpud's backup or temporary file beside it "
                "would be loaded too; narrow the import (e.g. '*.toml') and run again"
            )

    original, backup = None, None
    if file.exists:
        original = edited.read_bytes()
        info = edited.stat()
        mode, owner = info.st_mode & 0o7777, (info.st_uid, info.st_gid)
        backup = _backup(edited, original, mode, owner, now())
    else:
        mode, owner = NEW_FILE_MODE, None
    _write(edited, edit.text.encode("utf-8"), mode, owner)
    try:
        after = _read_node(path, root, containerd)
        missing = [
            g for graph in after.graphs for g in unmet(merge(graph, options.runtime_name), options)
        ]
        missing += _dump_gaps(after, options)
    except (ConfigError, DumpError, OSError) as exc:
        missing = [str(exc)]
    if missing:
        _put_back(edited, original, mode, owner, backup)
        raise VerifyError(
            f"after editing {file.shown}, {'; '.join(missing)}; {file.shown} was put back as it "
            "was (please report this)"
        )
    removed = rotate_backups(edited) if backup is not None else ()
    diff = "".join(
        difflib.unified_diff(
            file.text.splitlines(keepends=True),
            edit.text.splitlines(keepends=True),
            str(backup or "/dev/null"),
            str(edited),
        )
    )
    result = replace(
        base,
        created=not file.exists,
        backup=backup,
        diff=diff,
        effective=merge(after.graphs[0], options.runtime_name),
        judged_by=after.judged_by(after.dumpable),
        removed_backups=removed,
    )
    if restart is None:
        return result
    try:
        restart()
    except RestartError as exc:
        return replace(result, restart_error=str(exc))
    return replace(result, restarted=True)


def _put_back(
    path: Path,
    original: bytes | None,
    mode: int,
    owner: tuple[int, int] | None,
    backup: Path | None,
) -> None:
    if original is None:
        path.unlink(missing_ok=True)
    else:
        _write(path, original, mode, owner)
    if backup is not None:
        backup.unlink(missing_ok=True)


def backups_of(path: Path) -> list[Path]:
    """gpud's backups of ``path``, oldest first."""
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        if not name.startswith(path.name + BACKUP_INFIX):
            continue
        match = _BACKUP.fullmatch(name[len(path.name) :])
        if match:
            found.append((match[1], int(match[2] or 0), path.parent / name))
    return [p for _, _, p in sorted(found)]


def rotate_backups(path: Path, keep: int = KEEP_BACKUPS) -> tuple[Path, ...]:
    """Keep the first backup (the file before gpud ever changed it) and the newest ones,
    ``keep`` in all; remove the rest. Returns what was removed."""
    backups = backups_of(path)
    if len(backups) <= keep:
        return ()
    doomed = backups[1 : len(backups) - (keep - 1)]
    for old in doomed:
        old.unlink(missing_ok=True)
    return tuple(doomed)


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
