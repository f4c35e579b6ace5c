"""Adding the NVIDIA runtime to a containerd config: a pure edit over the config's text.

Why not ``nvidia-ctk runtime configure``: since v1.18 it writes a drop-in that copies the whole CRI
table (registry credentials included) into a new, world-readable file, drops every comment,
re-sorts the file, and on MicroK8s copies ``${…}`` template placeholders into a file MicroK8s never
renders (a broken runtime). This module gives the same effective runtime settings (the facts are
in shared/reference/nvidia-ctk-rules.md) but edits the config *in place* with a round-trip TOML
library, so comments, order, quoting and indentation survive and only the needed keys change.

Rules (nvidia-ctk's, unless marked *gpud*):

- Version: ``version`` from the file; no key in a non-empty file → 1; an empty file → 2 (and
  ``version = 2`` is written). *gpud*: a file with comments only also counts as empty (nvidia-ctk
  would call it version 1 and write a v1 config); its comments stay above what is added. *gpud*:
  a drop-in without ``version`` is read with the top-level's version (``inherit_version``), as
  containerd 1.6 and 2.1 both do. Only 1 to 4 are accepted: containerd 1.x reads 1 and 2, 2.0 to
  2.2 read up to 3 and 2.3 up to 4 (2.1 refuses 4 with "expected containerd config version equal
  to or less than `3`"); a non-integer version is refused as nvidia-ctk refuses it.
- CRI table: 1 → ``plugins.cri``, 2 → ``plugins."io.containerd.grpc.v1.cri"``, 3 and 4 →
  ``plugins."io.containerd.cri.v1.runtime"`` (version 4 moved only server settings).
- ``<cri>.containerd.runtimes.<name>`` = a deep copy of the template runtime: the one
  ``default_runtime_name`` names (if it is set, does not start with ``nvidia`` and the table
  exists), else ``runc``, else ``crun``, else a minimal runc-v2 entry. So ``SystemdCgroup`` and the
  other options carry over. *gpud*: a ``${…}`` default (MicroK8s' ``"${RUNTIME}"``, rendered to
  ``runc``) names no table, so runc is used. Placeholders in copied values (``"${RUNTIME_TYPE}"``)
  are kept: MicroK8s renders them in the template. *gpud*: the fallback entry omits nvidia-ctk's
  empty ``runtime_engine``/``runtime_root`` (containerd 2 warns about them; empty is the default).
- ``runtime_type`` = ``io.containerd.runc.v2`` only if missing or empty; ``options.BinaryName`` =
  the binary; version 1 also sets ``options.Runtime``.
- ``set_as_default`` → ``<cri>.containerd.default_runtime_name = name``. *gpud*: without it the key
  is left alone (nvidia-ctk 1.20 drops it from its drop-in when it names nvidia; 1.17 keeps it).
- ``enable_cdi`` → ``<cri>.enable_cdi = true`` (version 1: ``<cri>.containerd.enable_cdi``).
- *gpud*, an existing ``runtimes.<name>`` is updated, not replaced (nvidia-ctk replaces it and so
  loses e.g. an operator's ``privileged_without_host_devices = true``): every key the operator set
  stays, keys of the template it lacks are added, and ``options.SystemdCgroup`` follows the template
  (a cgroup driver that differs from runc's and the kubelet's breaks pods). Kept differences are
  reported in the notes.

When the file is one of several containerd merges (its ``imports``), the caller passes the
runtimes containerd ends up with (:class:`Effective`), so the new entry copies the runtime that is
really the default, and ``add_runtime=False`` edits only the default/CDI keys of a file that must
carry them while another file carries the runtime.

Layout: new keys take the indentation of their siblings (in a new table: of the template's keys,
else the file's usual key indentation under a header); a file whose every line ends in CRLF keeps
CRLF on the lines gpud adds.

The result is checked before it is returned: the edited text is parsed again (by a second,
independent parser where available) and must equal the intended configuration exactly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import ParseError, TOMLKitError
from tomlkit.items import AoT, Comment, InlineTable, Item, String, StringType, Table, Whitespace

RUNC_V2 = "io.containerd.runc.v2"
DEFAULT_BINARY = "/usr/bin/nvidia-container-runtime"

CRI_PLUGINS = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
SUPPORTED_VERSIONS = (1, 2, 3, 4)
VERSIONS_TEXT = (
    "containerd 1.x reads config versions 1 and 2, containerd 2.0 to 2.2 up to 3, 2.3 up to 4"
)

_REPORTED = frozenset({"runtime_type", "BinaryName", "Runtime"})
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


class ConfigError(ValueError):
    """The config cannot be edited safely: not TOML, a bad ``version``, a key of the wrong type.

    ``line``/``column`` (1-based) point at the problem when the parser knows where it is.
    """

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(f"{where}{message}")
        self.line = line
        self.column = column


class EditError(ConfigError):
    """gpud could not express the change in this file's layout; a bug report, not a node fault.

    Raised instead of returning text that would not mean what was intended.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"gpud cannot edit this file's layout safely: {message}")


@dataclass(frozen=True)
class RuntimeOptions:
    """What to configure; the defaults are those of ``nvidia-ctk runtime configure``."""

    runtime_name: str = "nvidia"
    binary: str = DEFAULT_BINARY
    set_as_default: bool = False
    enable_cdi: bool = False
    add_runtime: bool = True
    """False: only ``default_runtime_name``/``enable_cdi`` (the runtime lives in another file)."""

    def __post_init__(self) -> None:
        if not self.runtime_name or "\n" in self.runtime_name:
            raise ValueError(f"invalid runtime name {self.runtime_name!r}")
        if not self.binary.startswith("/"):
            raise ValueError(f"the NVIDIA runtime path {self.binary!r} is not an absolute path")


@dataclass(frozen=True)
class Effective:
    """What containerd makes of all the files it merges, for an edit to one of them.

    ``runtimes`` is the merged ``containerd.runtimes`` table and ``default_runtime_name`` the
    merged default, so the nvidia entry copies the runtime that is really the default.
    """

    runtimes: Mapping[str, Any]
    default_runtime_name: str | None


@dataclass(frozen=True)
class Edit:
    """The edited config. ``text`` is the input, byte for byte, when ``changed`` is false."""

    text: str
    changed: bool
    version: int
    cri_table: str
    notes: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()


def cri_plugin(version: int) -> str:
    """The CRI plugin's name under ``plugins`` for a config version."""
    return CRI_PLUGINS[min(version, 3)]


def parse(text: str) -> tomlkit.TOMLDocument:
    """The round-trip document; :class:`ConfigError` (with its position) for text not TOML."""
    try:
        return tomlkit.parse(text)
    except ParseError as exc:
        raise ConfigError(f"not valid TOML: {_parse_reason(exc)}", exc.line, exc.col) from None
    except TOMLKitError as exc:  # e.g. a key defined twice
        raise ConfigError(f"not valid TOML: {exc}") from None


def file_version(text: str, data: Mapping[str, Any]) -> int | None:
    """The ``version`` key, checked; None when the file has none. :class:`ConfigError` for a
    value no containerd reads."""
    if "version" not in data:
        return None
    raw = data["version"]
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(
            f"unsupported config version {raw!r}: 'version' must be an integer ({VERSIONS_TEXT})",
            *_key_position(text, "version"),
        )
    if raw not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"unsupported config version {raw}: {VERSIONS_TEXT}", *_key_position(text, "version")
        )
    return raw


def configure(
    text: str,
    options: RuntimeOptions | None = None,
    *,
    inherit_version: int | None = None,
    effective: Effective | None = None,
) -> Edit:
    """Add (or bring up to date) the NVIDIA runtime in a containerd config, editing ``text``.

    ``inherit_version`` is the top-level's version when ``text`` is an imported file (a drop-in
    without ``version`` is read with it, and gets no ``version`` key of its own);
    ``effective`` is the merged view when other files take part (see :class:`Effective`).
    Raises :class:`ConfigError` for input that cannot be edited safely; nothing is half-done
    because nothing is written here.
    """
    options = options or RuntimeOptions()
    doc = parse(text)
    data = doc.unwrap()
    notes: list[str] = []

    own = file_version(text, data)
    empty = not data and inherit_version is None
    if empty:
        version = 2
        notes.append("empty config: writing a version 2 config")
    elif own is not None:
        version = own
    elif inherit_version is not None:
        version = inherit_version
    else:
        version = 1
        notes.append("no 'version' key: containerd reads this as a version 1 config")
    plugin = cri_plugin(version)
    cri_path = ("plugins", plugin)
    cri_table = "plugins." + _dotted_key(plugin)

    plan = _plan(data, version, cri_path, options, notes, effective)
    expected = _apply_plain(data, plan, empty)

    editor = _DocEditor(doc)
    if empty:
        editor.set_value(doc, "version", 2, ("version",))
    editor.apply(plan)
    editor.finish()
    new_text = doc.as_string()
    if _crlf_only(text):
        new_text = re.sub(r"(?<!\r)\n", "\r\n", new_text)

    if not empty and _same(data, expected):
        # Already configured: hand back the input itself, not a re-rendering of it.
        return Edit(text, False, version, cri_table, tuple(notes))
    _verify(new_text, expected)
    return Edit(new_text, True, version, cri_table, tuple(notes), tuple(editor.changes))


# --- the plan: what the config must say, decided on plain data ------------------------------


@dataclass(frozen=True)
class _Plan:
    cri_path: tuple[str, ...]
    runtime_path: tuple[str, ...]
    runtime: dict[str, Any] | None
    """None: the runtime entry is not this file's to change (``add_runtime=False``)."""
    template_name: str | None
    default_path: tuple[str, ...] | None
    default_name: str | None
    cdi_path: tuple[str, ...] | None


def _plan(
    data: Mapping[str, Any],
    version: int,
    cri_path: tuple[str, ...],
    options: RuntimeOptions,
    notes: list[str],
    effective: Effective | None = None,
) -> _Plan:
    cri = _table_at(data, cri_path)
    ctd = _table_at(cri, ("containerd",), cri_path)
    runtimes = _table_at(ctd, ("runtimes",), (*cri_path, "containerd"))
    runtimes_path = (*cri_path, "containerd", "runtimes")
    name = options.runtime_name

    runtime = None
    template_name = None
    if options.add_runtime:
        if effective is not None:
            template_name, template = _template(
                effective.default_runtime_name, effective.runtimes, runtimes_path, notes
            )
        else:
            template_name, template = _template(
                ctd.get("default_runtime_name"), runtimes, runtimes_path, notes
            )
        runtime = _runtime(runtimes.get(name), template, template_name, runtimes_path, name, notes)
        opts = runtime.setdefault("options", {})
        if not isinstance(opts, dict):
            raise ConfigError(f"{_path_text((*runtimes_path, name, 'options'))} is not a table")
        opts["BinaryName"] = options.binary
        if version == 1:
            opts["Runtime"] = options.binary

    default_path = default_name = None
    if options.set_as_default:
        default_path, default_name = (*cri_path, "containerd", "default_runtime_name"), name
    elif ctd.get("default_runtime_name") == name:
        notes.append(f"default_runtime_name is already {name!r}; left as it is")

    cdi_path = None
    if options.enable_cdi:
        cdi_path = (
            (*cri_path, "containerd", "enable_cdi") if version == 1 else (*cri_path, "enable_cdi")
        )
        if version < 3:
            notes.append("enable_cdi needs containerd >= 1.7; 1.6 ignores it")
    return _Plan(
        cri_path,
        (*runtimes_path, name),
        runtime,
        template_name,
        default_path,
        default_name,
        cdi_path,
    )


def _runtime(
    existing: Any,
    template: Mapping[str, Any] | None,
    template_name: str | None,
    runtimes_path: tuple[str, ...],
    name: str,
    notes: list[str],
) -> dict[str, Any]:
    """The runtime entry this file must hold: a copy of the template, or the existing entry
    with what it lacks filled in from the template and ``SystemdCgroup`` following it."""
    if existing is not None and not isinstance(existing, Mapping):
        raise ConfigError(f"{_path_text((*runtimes_path, name))} is not a table")
    if existing is None:
        if template is None:
            notes.append(
                f"no runc or crun runtime to copy options from: {name} gets a plain runc v2 entry"
            )
            runtime = {"privileged_without_host_devices": False, "runtime_type": RUNC_V2}
        else:
            notes.append(f"{name}: a copy of runtime {template_name!r}")
            runtime = copy.deepcopy(dict(template))
    else:
        runtime = copy.deepcopy(dict(existing))
        if template is not None:
            _fill_missing(runtime, template)
            notes.extend(_kept_differences(existing, template, name, template_name))
            t_opts = template.get("options")
            if isinstance(t_opts, Mapping) and "SystemdCgroup" in t_opts:
                r_opts = runtime.setdefault("options", {})
                if not isinstance(r_opts, dict):
                    raise ConfigError(
                        f"{_path_text((*runtimes_path, name, 'options'))} is not a table"
                    )
                r_opts["SystemdCgroup"] = t_opts["SystemdCgroup"]
    if not runtime.get("runtime_type"):
        runtime["runtime_type"] = RUNC_V2
    return runtime


def _template(
    default: Any,
    runtimes: Mapping[str, Any],
    runtimes_path: tuple[str, ...],
    notes: list[str],
) -> tuple[str | None, Mapping[str, Any] | None]:
    """The runtime whose table the new one copies: the default one, then runc, then crun."""
    candidates = []
    if isinstance(default, str) and default:
        if _PLACEHOLDER.search(default):
            notes.append(
                f"default_runtime_name {default!r} is a template placeholder (MicroK8s renders "
                "it to runc): copying runc"
            )
        elif not default.startswith("nvidia"):
            candidates.append(default)
    candidates += ["runc", "crun"]
    for candidate in candidates:
        table = runtimes.get(candidate)
        if isinstance(table, Mapping):
            return candidate, table
        if table is not None:
            raise ConfigError(f"{_path_text((*runtimes_path, candidate))} is not a table")
    return None, None


def _fill_missing(target: dict[str, Any], source: Mapping[str, Any]) -> None:
    for key, value in source.items():
        if key not in target:
            target[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping) and isinstance(target[key], dict):
            _fill_missing(target[key], value)


def _kept_differences(
    existing: Mapping[str, Any], template: Mapping[str, Any], name: str, template_name: str | None
) -> list[str]:
    notes = []
    owned = {"runtime_type", "options.BinaryName", "options.Runtime", "options.SystemdCgroup"}
    for key, value in _leaves(existing):
        if key in owned:
            continue
        other = lookup(template, key.split("."), _MISSING)
        if other is not _MISSING and not _same(value, other):
            notes.append(f"kept {name}'s own {key} = {value!r} ({template_name} has {other!r})")
    return notes


def _apply_plain(data: Mapping[str, Any], plan: _Plan, empty: bool) -> dict[str, Any]:
    """The configuration the edited text must parse to, for the independent check."""
    out = copy.deepcopy(dict(data))
    if empty:
        out["version"] = 2
    if plan.runtime is not None:
        _put(out, plan.runtime_path, copy.deepcopy(plan.runtime))
    if plan.default_path is not None:
        _put(out, plan.default_path, plan.default_name)
    if plan.cdi_path is not None:
        _put(out, plan.cdi_path, True)
    return out


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


# --- the edit: the same changes on the round-trip document ------------------------------------


class _DocEditor:
    """Applies a plan to a tomlkit document, touching only what differs.

    New keys go right after the table's last key (not after comments that belong to the next
    header) with their siblings' indentation; new tables go at the end of their parent, and the
    comment block above the following header moves down with that header. Comments at the very
    end of the file (or all of a comments-only file) stay where they are, above what is added.
    """

    def __init__(self, doc: tomlkit.TOMLDocument) -> None:
        self.doc = doc
        self.changes: list[str] = []
        self.created: list[Table] = []
        self.key_step = _usual_key_step(doc)
        self.header_step = _usual_header_step(doc)

    def finish(self) -> None:
        """Header-less (super) tables we created must not add blank lines of their own."""
        for table in self.created:
            if table.is_super_table():
                table.trivia.indent = ""

    def apply(self, plan: _Plan) -> None:
        if plan.runtime is not None:
            runtimes = self.table(plan.runtime_path[:-1])
            name = plan.runtime_path[-1]
            style = runtimes.get(plan.template_name) if plan.template_name else None
            if not isinstance(style, (Table, InlineTable)):
                style = None
            if name not in runtimes:
                self.new_table(runtimes, name, plan.runtime_path, like=style)
            self.sync(runtimes[name], plan.runtime, plan.runtime_path, style)
        if plan.default_path is not None:
            owner = self.table(plan.default_path[:-1])
            self.set_value(owner, plan.default_path[-1], plan.default_name, plan.default_path)
        if plan.cdi_path is not None:
            owner = self.table(plan.cdi_path[:-1])
            self.set_value(owner, plan.cdi_path[-1], True, plan.cdi_path)

    def table(self, path: tuple[str, ...]) -> Any:
        node: Any = self.doc
        for depth, key in enumerate(path):
            if key not in node:
                self.new_table(node, key, path[: depth + 1], like=None)
            node = node[key]
        return node

    def new_table(self, owner: Any, key: str, path: tuple[str, ...], like: Any) -> None:
        body = _container(owner)
        if body is None:  # an inline table, or a table spread over the file: tomlkit places it
            owner[key] = tomlkit.inline_table() if isinstance(owner, InlineTable) else {}
            self.changes.append(f"add table {_path_text(path)}")
            return
        table = tomlkit.table()
        header = (
            _header_indent(like) if isinstance(like, Table) else self.header_indent(path, owner)
        )
        # Trailing comments are the next header's only when something follows this table.
        at_end = _last_body(body) is _last_body(self.doc)
        moved = [] if at_end else _take_next_header_trivia(body)
        # A first child directly under the document's start needs no blank line before it.
        ends_blank = owner is self.doc if not body.body else _ends_blank(body)
        table.trivia.indent = ("" if ends_blank else "\n") + header
        _append(owner, key, table)
        for item in moved:
            table.value.append(None, item)
        self.created.append(table)
        self.changes.append(f"add table {_path_text(path)}")

    def sync(
        self, table: Any, target: Mapping[str, Any], path: tuple[str, ...], style: Any
    ) -> None:
        """Make ``table`` equal ``target``: set differing values, add missing keys, drop extras."""
        for key, value in target.items():
            sub_style = style.get(key) if isinstance(style, (Table, InlineTable)) else None
            if isinstance(value, Mapping):
                if key not in table:
                    self.new_table(table, key, (*path, key), like=sub_style)
                self.sync(table[key], value, (*path, key), sub_style)
            else:
                self.set_value(table, key, value, (*path, key), style)
        for key in [k for k in table if k not in target]:
            del table[key]
            self.changes.append(f"remove {_path_text((*path, key))}")

    def set_value(
        self, owner: Any, key: str, value: Any, path: tuple[str, ...], style: Any = None
    ) -> None:
        if key in owner:
            if _same(owner[key], value):
                return
            owner[key] = _styled(value, owner[key])
            self.changes.append(f"set {_path_text(path)} = {_show(value)}")
            return
        sample = style.get(key) if isinstance(style, (Table, InlineTable)) else None
        item = copy.deepcopy(sample) if isinstance(sample, Item) and _same(sample, value) else None
        if item is None:
            like = _any_string(style)
            item = _styled(value, like if like is not None else _any_string(owner))
        item.trivia.comment_ws = ""
        item.trivia.comment = ""
        item.trivia.trail = "\n"
        if not any(owner is table for table in self.created) or key in _REPORTED:
            # Inside a table we just added, only the keys that make it NVIDIA's are news.
            self.changes.append(f"set {_path_text(path)} = {_show(value)}")
        body = _container(owner)
        if body is None:  # an inline table, or a table spread over the file: tomlkit places it
            owner[key] = item
            return
        if isinstance(owner, Table) and owner._is_super_table:
            # A header-less table that now holds a value needs its header back.
            owner.trivia.indent = self.header_indent(path[:-1], self.node(path[:-2]))
            owner._is_super_table = False
        index, indent = _key_slot(owner, body, style, self.key_step)
        item.trivia.indent = indent
        if index >= len(body.body):
            _append(owner, key, item)
        else:
            body._insert_at(index, key, item)
            if isinstance(owner, Table):
                dict.__setitem__(owner, key, item)

    def node(self, path: tuple[str, ...]) -> Any:
        node: Any = self.doc
        for key in path:
            node = node[key]
        return node

    def header_indent(self, path: tuple[str, ...], owner: Any) -> str:
        """Indentation for a new (or newly shown) header at ``path``: its siblings' under
        ``owner``, else the nearest shown ancestor's plus the file's usual step per level."""
        body = _container(owner)
        if body is not None:
            for _, item in reversed(body.body):
                if isinstance(item, Table) and not item.is_super_table():
                    return _header_indent(item)
        base, levels, node = None, 0, self.doc
        for depth, key in enumerate(path[:-1]):
            node = node.get(key) if isinstance(node, (Container, Table)) else None
            if isinstance(node, Table) and not node.is_super_table():
                base, levels = _header_indent(node), len(path) - 1 - depth
        if base is None:
            return ""
        if self.header_step is None:
            return base + "  " if base else ""
        return base + self.header_step * levels


def _append(owner: Any, key: str, item: Item) -> None:
    """Append without tomlkit re-indenting the item by its parent's indentation (we did that)."""
    if isinstance(owner, Table):
        owner.raw_append(key, item)
    else:
        owner.append(key, item)


def _container(owner: Any) -> Container | None:
    if isinstance(owner, Container):
        return owner
    if isinstance(owner, Table):
        return owner.value
    return None


def _is_trivia(item: Item) -> bool:
    return isinstance(item, (Whitespace, Comment))


def _key_slot(owner: Any, body: Container, style: Any, step: str | None) -> tuple[int, str]:
    """Where a new key goes (after the last key/value) and the indentation its siblings use.

    A table without keys yet takes the indentation of the keys of the table it copies (``style``)
    when their headers line up, else the file's usual step from header to key (``step``).
    A document without keys takes it after its leading comments, before its first table.
    """
    last = -1
    for index, (key, item) in enumerate(body.body):
        if key is not None and not isinstance(item, (Table, AoT)):
            last = index
    if last >= 0:
        sibling = body.body[last][1]
        return last + 1, sibling.trivia.indent.replace("\n", "")
    if isinstance(owner, Table):
        header = owner.trivia.indent.replace("\n", "")
        model = _first_key_indent(style) if isinstance(style, Table) else None
        if model is not None and _header_indent(style) == header:
            return 0, model
        if step is not None:
            return 0, header + step
        return 0, header + ("  " if header else "")
    tables = [i for i, (_, item) in enumerate(body.body) if isinstance(item, (Table, AoT))]
    return (tables[0] if tables else len(body.body)), ""


def _first_key_indent(table: Table) -> str | None:
    for key, item in table.value.body:
        if key is not None and not isinstance(item, (Table, AoT)):
            return item.trivia.indent.replace("\n", "")
    return None


def _usual_key_step(doc: tomlkit.TOMLDocument) -> str | None:
    """The most common indentation of a table's keys beyond its header's, over the file."""
    counts: dict[str, int] = {}

    def visit(container: Container) -> None:
        for _, item in container.body:
            if not isinstance(item, Table):
                continue
            key_indent = _first_key_indent(item)
            header = _header_indent(item)
            keyed = key_indent is not None and not item.is_super_table()
            if keyed and key_indent.startswith(header):
                step = key_indent[len(header) :]
                counts[step] = counts.get(step, 0) + 1
            visit(item.value)

    visit(doc)
    return max(counts, key=lambda step: counts[step]) if counts else None


def _usual_header_step(doc: tomlkit.TOMLDocument) -> str | None:
    """The most common indentation of a shown sub-table header beyond its shown parent's:
    ``""`` in a flat file, two spaces in containerd's own nested layout; None when unknown."""
    counts: dict[str, int] = {}

    def visit(container: Container, parent: str | None) -> None:
        for _, item in container.body:
            if not isinstance(item, Table):
                continue
            shown = not item.is_super_table()
            header = _header_indent(item)
            if shown and parent is not None and header.startswith(parent):
                step = header[len(parent) :]
                counts[step] = counts.get(step, 0) + 1
            visit(item.value, header if shown else None)

    visit(doc, None)
    return max(counts, key=lambda step: counts[step]) if counts else None


def _header_indent(table: Any) -> str:
    if isinstance(table, Table):
        return table.trivia.indent.replace("\n", "")
    return ""


def _last_body(body: Container) -> Container:
    """The container whose end is rendered last: descend through trailing sub-tables."""
    while True:
        items = [item for _, item in body.body if not _is_trivia(item)]
        if items and isinstance(items[-1], Table):
            body = items[-1].value
            continue
        return body


def _take_next_header_trivia(body: Container) -> list[Item]:
    """Cut the comment block that sits above the next header out of the end of ``body``.

    tomlkit files such comments under the *previous* table; a table appended there would come
    between the comment and the header it describes. The block is what follows the last blank line
    of the trailing comments and blank lines (all of them when there is no blank line).
    """
    last = _last_body(body)
    entries = last.body
    start = len(entries)
    while start > 0 and entries[start - 1][0] is None and _is_trivia(entries[start - 1][1]):
        start -= 1
    run = entries[start:]
    if not run:
        return []
    blanks = [
        i for i, (_, item) in enumerate(run) if isinstance(item, Whitespace) and "\n" in item.s
    ]
    split = blanks[-1] if blanks else 0  # no blank line: the whole run belongs to the next header
    moved = [item for _, item in run[split:]]
    for _ in range(len(run) - split):
        last.body.pop()  # trailing trivia: no key maps to it, so no index shifts
    return moved


def _ends_blank(body: Container) -> bool:
    last = _last_body(body)
    if not last.body:
        return False
    item = last.body[-1][1]
    return isinstance(item, Whitespace) and "\n" in item.s


def _any_string(table: Any) -> String | None:
    if isinstance(table, (Table, InlineTable)):
        for key in table:
            value = table.get(key)
            if isinstance(value, String):
                return value
            found = _any_string(value)
            if found is not None:
                return found
    return None


def _styled(value: Any, like: Any) -> Item:
    """A new tomlkit item for ``value``; strings copy the quote style of ``like`` (a string)."""
    literal = isinstance(like, String) and like.type is StringType.SLL
    if literal and isinstance(value, str) and "'" not in value and "\n" not in value:
        return tomlkit.string(value, literal=True)
    item = tomlkit.item(value)
    if isinstance(like, Item) and not isinstance(like, (Table, AoT)):
        item.trivia.indent = like.trivia.indent
    return item


# --- checks and small helpers -----------------------------------------------------------------


def _crlf_only(text: str) -> bool:
    """Every line of ``text`` ends in CRLF: then so must every line gpud adds."""
    return "\n" in text and text.count("\r\n") == text.count("\n")


def read_toml(text: str) -> dict[str, Any]:
    """Plain data from TOML text, with the standard library's strict reader where it exists
    (Python 3.11+) and tomlkit's on 3.10; ValueError for text that is not TOML."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return tomlkit.parse(text).unwrap()
    return tomllib.loads(text)


def _verify(text: str, expected: Mapping[str, Any]) -> None:
    """Parse the result again and compare: a formatting slip must never ship a wrong config."""
    try:
        parsed = read_toml(text)
    except ValueError as exc:
        raise EditError(f"the edited file would not be valid TOML ({exc})") from exc
    if not _same(parsed, expected):
        raise EditError("the edited file would not parse back to the intended configuration")


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Equality that tells booleans from integers (``True == 1`` in Python, not in TOML)."""
    if isinstance(a, Item):
        a = a.unwrap()
    if isinstance(b, Item):
        b = b.unwrap()
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _leaves(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def lookup(data: Mapping[str, Any], keys: Sequence[str], default: Any = None) -> Any:
    """The value at ``keys`` in nested tables, or ``default`` where any of them is missing."""
    node: Any = data
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def _table_at(
    data: Mapping[str, Any], path: tuple[str, ...], base: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    node: Mapping[str, Any] = data
    for depth, key in enumerate(path):
        value = node.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_path_text((*base, *path[: depth + 1]))} is not a table")
        node = value
    return node


def _dotted_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


def _path_text(path: tuple[str, ...]) -> str:
    return ".".join(_dotted_key(key) for key in path)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _parse_reason(exc: ParseError) -> str:
    message = str(exc)
    return re.sub(r"\s*at line \d+ col \d+$", "", message)


def _key_position(text: str, key: str) -> tuple[int | None, int | None]:
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(rf"\s*{re.escape(key)}\s*=", line)
        if match:
            return number, line.index(key) + 1
    return None, None
