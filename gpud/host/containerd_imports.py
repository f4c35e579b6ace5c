"""What containerd really loads: the top-level config, the files its ``imports`` name, and how
each containerd release merges them.

A node configured by nvidia-ctk >= 1.18 or the GPU Operator keeps the NVIDIA runtime in an
imported drop-in (``/etc/containerd/conf.d/99-nvidia.toml``), and an unrelated registry-mirror
drop-in can make the runtime of config.toml vanish. Judging one file is therefore wrong; this
module judges the merged config and names the file that decides each setting. The installed
containerd's own ``config dump`` (:mod:`gpud.host.containerd_dump`) is the ground truth where it
can run; these rules are the model that says *which file* decides, and the fallback without a
binary. Everything here is pure but for reading files through a :class:`View`.

Facts relied on (containerd's source: ``services/server/config/config.go`` in 1.6/1.7,
``cmd/containerd/server/config/config.go`` in 2.x; "observed" = checked with the binaries
scripts/setup installs, Debian's containerd 1.6.20 and 2.1.9, and kept true by the tests):

- Loading is breadth-first from the top-level file: each file's ``imports`` are resolved and
  queued, so all of the top-level's imports load (in order) before theirs; a path already loaded
  is skipped, which ends cycles. Later files win.
- An import containing ``*`` is a glob (Go's filepath.Glob: names sorted per directory, ``*``
  matching dot files too, never ``/``); any other import is cleaned and, if relative, joined to
  the importing file's directory. containerd 1.x globs a *relative* pattern against its working
  directory (``/`` for a systemd service), not the file's: the fix (containerd PR 9746, "Fix
  config import relative path glob") is in 2.0 only; its 1.7 and 1.6 backports (PRs 9834, 9835)
  were never merged. [observed]
- Merging, containerd < 2.0: ``mergeConfig`` copies each ``plugins."<id>"`` table of a later file
  over the *whole* table of earlier ones ("Replace entire sections instead of merging map's
  values"; containerd issue 5837). So a drop-in holding only a registry mirror under
  ``plugins."io.containerd.grpc.v1.cri"`` wipes every other CRI setting of config.toml, the
  nvidia runtime included - why nvidia-ctk >= 1.18 copies the whole CRI table into its drop-in.
  [observed, 1.6.20]
- Merging, containerd >= 2.0.0: plugin tables merge key by key (PR 9982, "Allow sections of
  Plugins to be merged, and not overwritten as entire sections", listed in the v2.0.0 release
  highlights). A later file's value wins, false and "" included; arrays are replaced, not joined;
  tables merge. [observed, 2.1.9] (The issue that asked for this work says 2.1; the release
  notes say 2.0.0, and gpud follows them.)
- Every file is read in the top-level's layout. A drop-in without ``version`` takes the
  top-level's; a drop-in that declares another version keeps its CRI settings under names the
  merged config does not read (2.1.9 ignores the CRI table of a version 2 drop-in in a version 3
  config). [observed]
- containerd 1.x reads the CRI plugin only as ``io.containerd.grpc.v1.cri`` (``cri`` in version
  1), so a version 3 file loads but its CRI settings are ignored [observed 1.6.20]; containerd 2.x
  does not carry a version 1 file's CRI settings over [observed 2.1.9]; 2.0-2.2 refuse version 4,
  which 2.3 introduced with the CRI names of version 3.
- A missing non-glob import: containerd 1.6 does not start ("failed to load TOML") [observed;
  1.7 not checked]; 2.x silently stops at it, skipping every file still queued [observed 2.1.9].
- ``enable_cdi``: containerd 1.6 has no such setting; 1.7 defaults it to false, 2.x to true
  [2.x observed].

When the release is unknown (containerd not installed yet, k3s' embedded one, a root prefix
whose binary cannot run here), the config's version narrows it (1: containerd 1.x; 3 or 4: 2.x)
and for a version 2 config gpud judges under both rule sets and believes a setting only when
both agree. An edit then goes to the last file that names the CRI plugin: under the 1.x rule it
is the file that decides, and as the last of the files that could set anything there, its values
also win under the 2.x rule. If the two rule sets load different files (a relative glob), gpud
cannot know which applies and refuses to edit.
"""

from __future__ import annotations

import copy
import itertools
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpud.host.containerd import (
    ConfigError,
    Effective,
    RuntimeOptions,
    configure,
    cri_plugin,
    file_version,
    lookup,
    parse,
)

_RELEASE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")
_GLOB_META = re.compile(r"[*?\[\\]")


# --- releases and their rules -------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Release:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_release(version_output: str) -> Release | None:
    """``containerd --version``: ``containerd github.com/containerd/containerd 1.6.20~ds1 …``,
    ``containerd containerd.io 1.7.27 <commit>``, ``… containerd/v2 2.1.9+unknown``."""
    for word in version_output.split()[1:]:
        match = _RELEASE.match(word)
        if match:
            return Release(int(match[1]), int(match[2]), int(match[3] or 0))
    return None


@dataclass(frozen=True)
class Rules:
    """How one containerd release (or family, when the release is unknown) loads a config."""

    label: str
    deep_merge: bool
    globs_from_file: bool
    """Relative globs resolve against the importing file's directory (2.0+), else the cwd."""
    max_version: int
    reads_v1_cri: bool
    cdi_default: bool | None
    """``enable_cdi`` when no file sets it; None: this release has no such setting (1.6)."""
    missing_import_fatal: bool


RULES_1X = Rules("containerd 1.x", False, False, 2, True, False, True)
RULES_2X = Rules("containerd 2.x", True, True, 4, False, True, False)


def rules_for(release: Release | None) -> tuple[Rules, ...]:
    """The rules of ``release``; both families when it is unknown."""
    if release is None:
        return (RULES_1X, RULES_2X)
    label = f"containerd {release}"
    if release.major < 2:
        return (replace(RULES_1X, label=label, cdi_default=None if release.minor < 7 else False),)
    return (replace(RULES_2X, label=label, max_version=4 if release >= Release(2, 3, 0) else 3),)


def plausible(graphs: tuple[Graph, ...]) -> tuple[Graph, ...]:
    """With the release unknown, the families that could run this config: a version 1 config
    only means something to containerd 1.x, a version 3 or 4 one only to 2.x."""
    version = graphs[0].version
    kept = tuple(
        g
        for g in graphs
        if (g.rules.deep_merge and version >= 2) or (not g.rules.deep_merge and version <= 2)
    )
    return kept or graphs


# --- files and where they lie --------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """Where containerd's paths lie: under ``root`` (``/`` on a node; a chroot or a test tree),
    with containerd's working directory at the root's ``/`` (a systemd service's)."""

    root: Path

    def locate(self, name: str) -> Path:
        return self.root / name.lstrip("/") if name not in ("", ".") else self.root

    @staticmethod
    def shown(name: str) -> str:
        """The path as the node names it (a relative name is relative to ``/``)."""
        return name if name.startswith("/") else "/" + name


@dataclass(frozen=True)
class ConfigFile:
    name: str
    """The path as containerd names it (absolute, or relative to its working directory)."""
    path: Path
    """Where it lies here."""
    text: str
    data: Mapping[str, Any]
    version: int | None
    """Its own ``version`` key; None when it has none."""
    exists: bool = True
    via: str | None = None
    """The import entry that named it; None for the top-level file."""

    @property
    def shown(self) -> str:
        return View.shown(self.name)


@dataclass(frozen=True)
class Graph:
    """The files containerd loads for one top-level config, in the order it merges them."""

    rules: Rules
    files: tuple[ConfigFile, ...]
    globs: tuple[str, ...]
    """Every glob an import resolved to (as containerd names paths), for :func:`would_import`."""
    problems: tuple[str, ...]
    """Why containerd would not load what the files say (missing import, bad version, …)."""

    @property
    def top(self) -> ConfigFile:
        return self.files[0]

    @property
    def version(self) -> int:
        """The layout every file is read in: the top-level's (no key: 1; an empty file: 2)."""
        top = self.top
        if top.version is not None:
            return top.version
        return 1 if top.data else 2


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def load(top: str, view: View, rules: Rules, read: Callable[[Path], str] = _read) -> Graph:
    """Read ``top`` (as containerd names it) and every file its imports pull in.

    Raises :class:`ConfigError` when the top-level file is not a config containerd could read,
    and :class:`OSError` when it cannot be read; problems with imported files are collected in
    :attr:`Graph.problems`, since each release reacts to them differently.
    """
    files: list[ConfigFile] = []
    problems: list[str] = []
    globs: list[str] = []
    pending: list[tuple[str, str | None]] = [(top, None)]
    loaded: set[str] = set()
    while pending:
        name, via = pending.pop(0)
        if name in loaded:
            continue
        path = view.locate(name)
        try:
            text = read(path)
            exists = True
        except FileNotFoundError:
            if via is None:
                text, exists = "", False
            else:
                problems.append(_missing(name, pending, rules))
                break
        except UnicodeDecodeError as exc:
            if via is None:
                raise ConfigError(f"not UTF-8 text: {exc}") from None
            problems.append(f"{View.shown(name)} is not UTF-8 text: containerd cannot load it")
            break
        except OSError as exc:
            if via is None:
                raise
            hint = " (run as root)" if isinstance(exc, PermissionError) else ""
            problems.append(f"{View.shown(name)} cannot be read: {exc.strerror or exc}{hint}")
            break
        try:
            doc = parse(text)
            data = doc.unwrap()
            version = file_version(text, data)
        except ConfigError as exc:
            if via is None:
                raise
            problems.append(f"{View.shown(name)}: {exc}: containerd does not start with it")
            break
        files.append(ConfigFile(name, path, text, data, version, exists, via))
        loaded.add(name)
        imports = data.get("imports", [])
        if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
            problems.append(f"{View.shown(name)}: 'imports' must be a list of paths")
            continue
        for entry in imports:
            try:
                resolved, pattern = resolve_import(name, entry, rules, view)
            except ConfigError as exc:
                problems.append(f"{View.shown(name)}: import {entry!r}: {exc}")
                continue
            if pattern is not None:
                globs.append(pattern)
            pending += [(match, entry) for match in resolved]
    graph = Graph(rules, tuple(files), tuple(globs), tuple(problems))
    return replace(graph, problems=(*problems, *_version_problems(graph)))


def _missing(name: str, pending: list[tuple[str, str | None]], rules: Rules) -> str:
    shown = View.shown(name)
    if rules.missing_import_fatal:
        return (
            f"imported file {shown} does not exist: {rules.label} cannot load the config "
            "(containerd 1.6 does not start)"
        )
    skipped = [View.shown(n) for n, _ in pending]
    rest = f", and skips {', '.join(skipped)}" if skipped else ""
    return f"imported file {shown} does not exist: {rules.label} ignores it{rest}"


def _version_problems(graph: Graph) -> list[str]:
    out = []
    version, rules, top = graph.version, graph.rules, graph.top
    if version > rules.max_version:
        if rules.max_version == 2:
            out.append(
                f"{top.shown} is config version {version}: {rules.label} reads versions 1 and 2 "
                "only and ignores its CRI settings"
            )
        else:
            out.append(
                f"{top.shown} is config version {version}: {rules.label} reads versions up to "
                f"{rules.max_version} and does not start"
            )
    if version == 1 and top.data and not rules.reads_v1_cri:
        out.append(
            f"{top.shown} is a version 1 config: {rules.label} does not carry its CRI settings "
            "over; convert it ('containerd config migrate' prints the new form)"
        )
    for file in graph.files[1:]:
        if file.version is not None and file.version != version:
            out.append(
                f"{file.shown} declares version {file.version} but {top.shown} is version "
                f"{version}: containerd reads every imported file in the top-level's layout and "
                "ignores CRI settings under other names"
            )
    return out


# --- import resolution (Go's rules) -------------------------------------------------------------


def _clean(path: str) -> str:
    """Go's filepath.Clean."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("/") else cleaned


def resolve_import(
    parent: str, entry: str, rules: Rules, view: View
) -> tuple[list[str], str | None]:
    """The paths one ``imports`` entry of ``parent`` names, and the glob it used (if any)."""
    if rules.globs_from_file or "*" not in entry:
        path = _clean(entry)
        if not path.startswith("/"):
            path = _clean(posixpath.join(posixpath.dirname(parent), path))
    else:
        path = entry  # containerd 1.x: a glob as written, relative to its working directory
    if "*" in path:
        return go_glob(path, view), path
    return [path], None


def go_glob(pattern: str, view: View) -> list[str]:
    """Go's filepath.Glob on containerd's names: lexical order per directory, no errors for
    missing directories; :class:`ConfigError` for a malformed pattern (containerd stops)."""
    if not _GLOB_META.search(pattern):
        return [pattern] if os.path.lexists(view.locate(pattern)) else []
    head, tail = posixpath.split(pattern)
    if head != "/":
        head = head.rstrip("/") or "."
    matcher = _go_pattern(tail)
    dirs = go_glob(head, view) if _GLOB_META.search(head) else [head]
    out = []
    for directory in dirs:
        try:
            names = sorted(os.listdir(view.locate(directory)))
        except OSError:
            continue
        for name in names:
            if matcher.fullmatch(name):
                out.append(name if directory == "." else posixpath.join(directory, name))
    return out


def _go_pattern(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax as a regular expression: ``*``, ``?``, ``[...]``/``[^...]``
    classes and ``\\`` escapes, none of them matching ``/``."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\":
            i += 1
            if i == len(pattern):
                raise ConfigError("malformed glob (trailing backslash)")
            out.append(re.escape(pattern[i]))
        elif char == "[":
            end = i + 1
            negate = end < len(pattern) and pattern[end] == "^"
            end += negate
            parts = []
            while end < len(pattern) and (pattern[end] != "]" or not parts):
                if pattern[end] == "\\":
                    end += 1
                    if end == len(pattern):
                        break
                parts.append(re.escape(pattern[end]) if pattern[end] != "-" else "-")
                end += 1
            if end >= len(pattern) or not parts:
                raise ConfigError("malformed glob (unclosed '[')")
            out.append(f"[{'^/' if negate else ''}{''.join(parts)}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


def would_import(graph: Graph, name: str) -> str | None:
    """The glob through which containerd would also load ``name``; None if none would."""
    parts = name.split("/")
    for pattern in graph.globs:
        pieces = pattern.split("/")
        if len(pieces) == len(parts) and all(
            _go_pattern(piece).fullmatch(part) for piece, part in zip(pieces, parts, strict=True)
        ):
            return pattern
    return None


# --- the merged view ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str | None
    """The file that sets it; None when containerd's own default applies."""


@dataclass(frozen=True)
class Merged:
    """What containerd runs, per :class:`Rules`, for one runtime name."""

    rules: Rules
    files: tuple[str, ...]
    runtimes: Mapping[str, Any]
    runtime: Setting
    binary: Setting
    default: Setting
    cdi: Setting
    overrides: tuple[str, ...]

    @property
    def default_name(self) -> str:
        """The default runtime containerd uses (``runc`` when no file names one)."""
        value = self.default.value
        return value if isinstance(value, str) and value else "runc"


def cri_key(version: int) -> tuple[str, str]:
    """(``plugins`` key of the CRI table, its dotted form) in a config of ``version``."""
    plugin = cri_plugin(version)
    quoted = plugin if re.fullmatch(r"[A-Za-z0-9_-]+", plugin) else f'"{plugin}"'
    return plugin, f"plugins.{quoted}"


def _cri_of(file: ConfigFile, version: int) -> Mapping[str, Any] | None:
    plugins = file.data.get("plugins")
    table = plugins.get(cri_key(version)[0]) if isinstance(plugins, Mapping) else None
    return table if isinstance(table, Mapping) else None


def _cdi_path(version: int) -> tuple[str, ...]:
    return ("containerd", "enable_cdi") if version == 1 else ("enable_cdi",)


def merge(graph: Graph, runtime_name: str = "nvidia") -> Merged:
    """The CRI settings containerd ends up with, and which file sets each."""
    version = graph.version
    _, cri_table = cri_key(version)
    tables = [(f, _cri_of(f, version)) for f in graph.files]
    named = [(f, t) for f, t in tables if t is not None]
    merged: dict[str, Any] = {}
    leaves: dict[tuple[str, ...], str] = {}  # path -> the file its value comes from
    mentions: dict[tuple[str, ...], list[str]] = {}  # table path -> every file that names it
    if graph.rules.deep_merge:
        for file, table in named:
            _fold(merged, leaves, mentions, table, file.shown, ())
    elif named:
        file, table = named[-1]
        _fold(merged, leaves, mentions, table, file.shown, ())
    v1_lost = version == 1 and bool(graph.top.data) and not graph.rules.reads_v1_cri
    if version > graph.rules.max_version or v1_lost:
        merged, leaves, mentions = {}, {}, {}  # this containerd ignores the CRI settings

    runtimes = lookup(merged, ("containerd", "runtimes"))
    runtimes = runtimes if isinstance(runtimes, Mapping) else {}
    rt_path = ("containerd", "runtimes", runtime_name)
    runtime = lookup(merged, rt_path)
    runtime = runtime if isinstance(runtime, Mapping) else None
    rt_source = mentions.get(rt_path, [None])[-1]
    binary_path = (*rt_path, "options", "BinaryName")
    default_path = ("containerd", "default_runtime_name")
    cdi_path = _cdi_path(version)
    cdi_value = lookup(merged, cdi_path)
    if graph.rules.cdi_default is None:
        cdi = Setting(None, None)  # containerd 1.6: no such setting, whatever the files say
    elif cdi_value is not None:
        cdi = Setting(cdi_value, leaves.get(cdi_path))
    else:
        cdi = Setting(graph.rules.cdi_default, None)
    settings = {
        "runtime": Setting(runtime, rt_source if runtime is not None else None),
        "binary": Setting(lookup(merged, binary_path), leaves.get(binary_path)),
        "default": Setting(lookup(merged, default_path), leaves.get(default_path)),
        "cdi": cdi,
    }
    watched = (rt_path, binary_path, default_path, cdi_path)
    overrides = _overrides(graph, named, cri_table, watched)
    return Merged(
        graph.rules,
        tuple(f.shown for f in graph.files),
        runtimes,
        overrides=tuple(overrides),
        **settings,
    )


def _fold(
    into: dict[str, Any],
    leaves: dict[tuple[str, ...], str],
    mentions: dict[tuple[str, ...], list[str]],
    table: Mapping[str, Any],
    source: str,
    path: tuple[str, ...],
) -> None:
    """Merge ``table`` into ``into`` as containerd 2.x does: tables merge, anything else
    (arrays, false, "") replaces; record which file each value and table comes from."""
    mentions.setdefault(path, []).append(source)
    for key, value in table.items():
        here = (*path, key)
        if isinstance(value, Mapping):
            if not isinstance(into.get(key), dict):
                into[key] = {}
                _forget(leaves, here)
            _fold(into[key], leaves, mentions, value, source, here)
        else:
            into[key] = copy.deepcopy(value)
            _forget(leaves, here)
            leaves[here] = source


def _forget(leaves: dict[tuple[str, ...], str], path: tuple[str, ...]) -> None:
    for key in [k for k in leaves if k[: len(path)] == path]:
        del leaves[key]


def _overrides(
    graph: Graph,
    named: list[tuple[ConfigFile, Mapping[str, Any]]],
    cri_table: str,
    watched: tuple[tuple[str, ...], ...],
) -> list[str]:
    """Where a later file changes what an earlier one says, in the settings gpud cares about."""
    out: list[str] = []
    if not graph.rules.deep_merge:
        last, table = named[-1] if named else (None, {})
        for earlier, old in named[:-1]:
            lost = [
                _describe(path, lookup(old, path))
                for path in watched
                if lookup(old, path) is not None and lookup(old, path) != lookup(table, path)
            ]
            ignored = f"; ignored there: {', '.join(lost)}" if lost else ""
            out.append(
                f"{last.shown} replaces the whole {cri_table} table of {earlier.shown} "
                f"({graph.rules.label} takes each plugin table from the last file that names "
                f"it){ignored}"
            )
        return out
    for path in watched[1:]:
        setters = [(f.shown, lookup(t, path)) for f, t in named if lookup(t, path) is not None]
        for (earlier, old), (later, new) in itertools.pairwise(setters):
            if old != new:
                out.append(
                    f"{later} sets {'.'.join(path)} = {_show(new)} over {earlier}'s {_show(old)}"
                )
    return out


def _describe(path: tuple[str, ...], value: Any) -> str:
    if isinstance(value, Mapping):
        return ".".join(path)
    return f"{'.'.join(path)} = {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


# --- which file to edit --------------------------------------------------------------------------


class Refusal(ConfigError):
    """Editing would not be safe; the message names the file and what stands in the way."""


@dataclass(frozen=True)
class Choice:
    """The one file to edit and the options for it."""

    file: ConfigFile
    options: RuntimeOptions
    inherit_version: int | None
    effective: Effective
    why: str


def _last_with(graph: Graph, path: tuple[str, ...]) -> ConfigFile | None:
    version = graph.version
    found = None
    for file in graph.files:
        table = _cri_of(file, version)
        if table is not None and lookup(table, path) is not None:
            found = file
    return found


def choose_target(graphs: tuple[Graph, ...], options: RuntimeOptions) -> Choice:
    """The file whose edit makes containerd run what ``options`` ask for, under every rule set
    in ``graphs`` (one per release family that may be installed).

    Raises :class:`Refusal` when containerd would not load the files as they are, or when the
    rule sets disagree on which files it loads.
    """
    first = graphs[0]
    problems = [p for g in graphs for p in g.problems]
    if problems:
        raise Refusal("; ".join(dict.fromkeys(problems)))
    names = {tuple(f.name for f in g.files) for g in graphs}
    if len(names) > 1:
        raise Refusal(
            "containerd 1.x and 2.x would load different files (a relative glob in 'imports' "
            "resolves against the working directory in 1.x, the file's directory in 2.x), and "
            "the installed containerd could not be asked; write the import as an absolute path"
        )
    version = first.version
    inherit = version
    name = options.runtime_name
    # What every possible containerd already runs needs no edit (2.x enables CDI by default).
    views = [merge(g, name) for g in graphs]
    if options.set_as_default and all(v.default_name == name for v in views):
        options = replace(options, set_as_default=False)
    if options.enable_cdi and all(v.cdi.value is True for v in views):
        options = replace(options, enable_cdi=False)
    if all(g.rules.deep_merge for g in graphs):
        merged = views[0]
        effective = Effective(merged.runtimes, merged.default.value)
        rt_file = _last_with(first, ("containerd", "runtimes", name)) or first.top
        candidates = [rt_file]
        if options.set_as_default:
            candidates.append(_last_with(first, ("containerd", "default_runtime_name")))
        if options.enable_cdi:
            candidates.append(_last_with(first, _cdi_path(version)))
        order = {f.name: i for i, f in enumerate(first.files)}
        target = max((c for c in candidates if c is not None), key=lambda f: order[f.name])
        add_runtime = True
        if target is not rt_file:
            runtime_only = RuntimeOptions(options.runtime_name, options.binary)
            add_runtime = configure(
                rt_file.text, runtime_only, inherit_version=_inherit(rt_file, inherit),
                effective=effective,
            ).changed  # fmt: skip
        why = "the last file that sets these keys (containerd 2.x merges imports key by key)"
        opts = replace(options, add_runtime=add_runtime)
    else:
        _, cri_table = cri_key(version)
        target = first.files[0]
        for file in first.files:
            if _cri_of(file, version) is not None:
                target = file
        table = _cri_of(target, version) or {}
        ctd = table.get("containerd")
        ctd = ctd if isinstance(ctd, Mapping) else {}
        runtimes = ctd.get("runtimes")
        effective = Effective(
            runtimes if isinstance(runtimes, Mapping) else {}, ctd.get("default_runtime_name")
        )
        why = (
            f"the last file that names {cri_table} (containerd 1.x takes that whole table from "
            "the last file that names it)"
        )
        opts = options
    if target is first.top:
        why = "the top-level config" if len(first.files) == 1 else f"{why}: the top-level"
    return Choice(target, opts, _inherit(target, inherit), effective, why)


def _inherit(file: ConfigFile, version: int | None) -> int | None:
    """Imported files without ``version`` are read with the top-level's."""
    return None if file.via is None else version


def unmet(merged: Merged, options: RuntimeOptions) -> list[str]:
    """What containerd runs that differs from what ``options`` ask, each with the file that
    sets it; [] when it runs what was asked."""
    name, label = options.runtime_name, merged.rules.label
    out = []
    if merged.runtime.value is None:
        out.append(f"{label} has no {name} runtime")
    elif merged.binary.value != options.binary:
        out.append(
            f"{label}'s {name} runtime runs {merged.binary.value!r}, not {options.binary!r}"
            + _set_in(merged.binary)
        )
    if options.set_as_default and merged.default_name != name:
        out.append(
            f"{label}'s default runtime is {merged.default_name!r}" + _set_in(merged.default)
        )
    cdi = merged.cdi
    if options.enable_cdi and merged.rules.cdi_default is not None and cdi.value is not True:
        out.append(f"{label} has enable_cdi = {_show(cdi.value)}" + _set_in(cdi))
    return out


def _set_in(setting: Setting) -> str:
    return f" (set in {setting.source})" if setting.source else ""
