"""Publishing node labels as an NFD local feature file (``features.d/gpud``).

nfd-worker reads every regular file in its ``features.d`` directory, skipping names that start
with ``.``, and nfd-master turns the ``key=value`` lines into node labels
(shared/reference/cluster-integration.md §3). This needs no Kubernetes credentials, and the
labels stay while the file stays: unlike GFD, which deletes its file when it stops, gpud leaves
the file in place across restarts and removes it only when labels are turned off or the package
is purged.

:func:`render` is pure: sorted lines, no timestamp, so equal labels give byte-equal files; every
entry nfd-master would refuse is left out with the reason instead of vanishing there.
:func:`publish` and :func:`withdraw` are the shell: an atomic replace through a dot-file in the
same directory, and only when the content differs, so an unchanged node never rewrites the file
(nfd-worker watches the directory and would republish on every write).

The file is named ``gpud``, beside GFD's ``gfd``: during a migration both may exist, and neither
tool touches the other's file. nfd-worker reads the files in name order and a key in a later
file overrides an earlier one, so for a key both define gpud's value wins.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpud.atomic import fsync_dir, write_atomic
from gpud.labels.names import (
    NFD_DEFAULT_NAMESPACE,
    key_problem,
    nfd_namespace_problem,
    value_problem,
)

DEFAULT_DIRECTORY = Path("/etc/kubernetes/node-feature-discovery/features.d")
FILE_NAME = "gpud"
# nfd-worker skips a feature file larger than this, with an error.
MAX_FILE_BYTES = 65536
# In gpud's state directory: the path of the feature file gpud last wrote, so that a directory
# changed in gpud.yaml, and the package's purge, remove exactly that file.
RECORD_NAME = "nfd-file"

HEADER = (
    "# Node labels published by gpud: GPU Feature Discovery's, computed from the node's GPUs,\n"
    "# and labels.static from /etc/gpud/gpud.yaml. gpud rewrites this file when the GPUs, the\n"
    "# MIG layout, sharing or the driver change; edits here are lost. See gpud's labels.md.\n"
)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A label left out of the file, and why nfd-master would have refused it."""

    name: str
    value: str
    reason: str


@dataclass(frozen=True)
class FeatureFile:
    """The file's text, the labels it carries, what was left out and what to know about it."""

    text: str
    labels: Mapping[str, str]
    rejected: tuple[Rejected, ...] = ()
    notes: tuple[str, ...] = ()


class FeatureFileError(Exception):
    """The feature file cannot be rendered or written; the message says what to do."""


def render(labels: Mapping[str, str]) -> FeatureFile:
    """The feature file for ``labels``: a comment header, then ``name=value`` lines by name.

    Raises FeatureFileError when the file would exceed NFD's 64 KiB limit (nfd-worker would skip
    all of it).
    """
    lines: list[str] = []
    kept: dict[str, str] = {}
    rejected: list[Rejected] = []
    notes: list[str] = []
    for name in sorted(labels):
        value = labels[name]
        problem = key_problem(name) or nfd_namespace_problem(name)
        if not problem and value_problem(value):
            problem = f"value {value!r}: {value_problem(value)}"
        if problem:
            rejected.append(Rejected(name, value, problem))
            continue
        if "/" not in name:
            notes.append(
                f"label {name!r} has no namespace: nfd-master publishes it as "
                f"{NFD_DEFAULT_NAMESPACE}/{name} unless its DisableAutoPrefix feature gate is on"
            )
        lines.append(f"{name}={value}\n")
        kept[name] = value
    text = HEADER + "".join(lines)
    size = len(text.encode("utf-8"))
    if size > MAX_FILE_BYTES:
        raise FeatureFileError(
            f"the feature file would be {size} bytes; nfd-worker skips files over "
            f"{MAX_FILE_BYTES} bytes: publish fewer static labels"
        )
    return FeatureFile(text, kept, tuple(rejected), tuple(notes))


class Outcome(enum.Enum):
    WRITTEN = "written"
    UNCHANGED = "unchanged"
    # NFD's directory does not exist (no NFD on this node) and writing was not forced.
    NO_DIRECTORY = "no-directory"
    REMOVED = "removed"
    ABSENT = "absent"


@dataclass(frozen=True)
class NfdTarget:
    """Where the feature file goes. ``force`` creates a missing directory instead of skipping;
    ``record`` is where gpud notes the path it wrote (None: not noted, nothing else removed)."""

    directory: Path = DEFAULT_DIRECTORY
    force: bool = False
    record: Path | None = None

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME


def record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_NAME


def publish(target: NfdTarget, text: str) -> Outcome:
    """Make ``target.path`` hold ``text``, writing only when it holds something else.

    A feature file gpud wrote in another directory before (the directory changed) is removed
    first. Raises FeatureFileError when the target cannot be written: the directory path or the
    file name is taken by something else, or the write fails (permissions, full disk).
    """
    _forget_moved(target)
    directory = target.directory
    if not directory.is_dir():
        if directory.exists() or directory.is_symlink():
            raise FeatureFileError(f"{directory} is not a directory: NFD's features.d must be one")
        if not target.force:
            return Outcome.NO_DIRECTORY
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatureFileError(f"cannot create {directory}: {exc.strerror}") from None
    data = text.encode("utf-8")
    outcome = Outcome.UNCHANGED
    if _current(target.path) != data:
        try:
            write_atomic(target.path, data)
        except OSError as exc:
            raise FeatureFileError(f"cannot write {target.path}: {exc.strerror}") from None
        outcome = Outcome.WRITTEN
    _note(target)
    return outcome


def withdraw(target: NfdTarget) -> Outcome:
    """Remove gpud's feature file (labels turned off): nfd-master then drops its labels.

    Also removes a file gpud wrote in another directory before, and the record. Never called
    when gpud stops: labels must survive a restart. Raises FeatureFileError when the name is
    taken by a directory or the removal fails.
    """
    _forget_moved(target)
    removed = _remove(target.path)
    if target.record is not None:
        _remove(target.record)
    return Outcome.REMOVED if removed else Outcome.ABSENT


def _current(path: Path) -> bytes | None:
    """The bytes of the regular file at ``path``; None when there is none.

    A symlink or other non-file there is never followed or opened (it may point anywhere, a FIFO
    would block): it is treated as absent, so the write replaces the name itself. A directory
    cannot be replaced by a file: that is an error.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FeatureFileError(f"cannot inspect {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise FeatureFileError(
            f"{path} is a directory, not gpud's feature file; remove it so gpud can publish labels"
        )
    if not stat.S_ISREG(info.st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FeatureFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        return file.read(MAX_FILE_BYTES + 1)


def _remove(path: Path) -> bool:
    """Unlink ``path`` (a symlink itself, never its target); False when nothing was there."""
    try:
        if stat.S_ISDIR(path.lstat().st_mode):
            raise FeatureFileError(
                f"{path} is a directory, not gpud's feature file; gpud leaves it alone"
            )
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise FeatureFileError(f"cannot remove {path}: {exc.strerror}") from None
    fsync_dir(path.parent)
    return True


def _recorded(target: NfdTarget) -> Path | None:
    if target.record is None:
        return None
    try:
        text = target.record.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text) if text else None


def _forget_moved(target: NfdTarget) -> None:
    """Remove the file gpud wrote under a directory it no longer publishes to.

    Only a path named like gpud's file is touched: the record is gpud's, but a path in it must
    never make gpud delete anything else.
    """
    old = _recorded(target)
    if old is None or old == target.path or old.name != FILE_NAME or not old.is_absolute():
        return
    _remove(old)


def _note(target: NfdTarget) -> None:
    if target.record is None or _recorded(target) == target.path:
        return
    try:
        write_atomic(target.record, f"{target.path}\n".encode())
    except OSError as exc:
        raise FeatureFileError(f"cannot write {target.record}: {exc.strerror}") from None
