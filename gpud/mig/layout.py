"""MIG layouts in mig-parted's config format (``version: v1``), and which GPU gets what.

gpud reads the files operators already have (mig-parted's ``config-default.yaml``, the GPU
Operator's ``default-mig-parted-config``) unchanged, so moving from mig-parted costs nothing. The
parser is strict the same way ``gpud/config/load.py`` is: an unknown key or a bad value is an
error, and every problem comes back as one "key.path: message" line so a person can fix a file in
one pass instead of one error at a time.

Pure: nothing here touches a GPU. :func:`select` turns a named layout into a per-GPU
:class:`GpuTarget` from the GPUs' indices and PCI device IDs alone; :mod:`gpud.mig.fit` then
checks a target against what the GPU offers, and :mod:`gpud.mig.planner` works out the NVML calls.
"""

from __future__ import annotations

import difflib
import json
import re
import reprlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpud.hw.types import MigLayoutState, MigMode
from gpud.mig import bounded_yaml

VERSION = "v1"
_TOP_KEYS = ("version", "mig-configs")
_ENTRY_KEYS = ("devices", "mig-enabled", "mig-devices", "device-filter")

# ---- bounds -------------------------------------------------------------------------------------
# Layout text comes from anyone in the gpud group (a dry run needs no root), so what reading it
# may cost is bounded before anything is built. Each bound is far above what a real file needs:
# mig-parted's own default config is 12 KiB, nests 5 levels and has about 1,300 nodes.

MAX_LAYOUT_BYTES = 256 * 1024
"""The largest layout text gpud reads (a file for ``-f``, ``mig.configFile``, a request)."""
MAX_DEPTH = 16
MAX_NODES = 20_000
"""YAML nodes in one file, an alias counted once per use (so an alias bomb is refused)."""
MAX_COUNT = 7
"""No profile fits more than 7 times on one GPU (7 compute slices), so no count may be higher."""
MAX_PROBLEMS = 20
"""Problems listed in one refusal; the rest are counted."""


class _Shown(reprlib.Repr):
    """Values echoed in messages, cut short: the input may be large, the message should not be."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 60
        self.maxlist = self.maxtuple = self.maxset = 6
        self.maxdict = 4
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        # repr() of a number of more than 4,300 digits raises; hex ones of any size parse.
        if x.bit_length() > 128:
            return f"<a {x.bit_length()}-bit number>"
        return repr(x)

    def repr_str(self, x: str, level: int) -> str:
        return repr(x) if len(x) <= self.maxstring else repr(x[: self.maxstring - 3]) + "..."


shown = _Shown().repr


def cut(text: str, limit: int = 60) -> str:
    """A name or path from the input, as a message quotes it."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- profile names ------------------------------------------------------------------------------

PROFILE_ATTRS = ("+me", "+me.all", "-me", "+gfx")
"""Suffixes NVIDIA puts on profile names (media engines, graphics; mig-profiles.md §1.1)."""

# Three digits at most: no GPU has more than 8 slices or 999 GB per instance, and an unbounded
# number would be read by int() (which refuses more than 4,300 digits).
_PROFILE = re.compile(
    r"(?:(?P<c>[1-9][0-9]{0,2})c\.)?(?P<g>[1-9][0-9]{0,2})g\.(?P<m>[1-9][0-9]{0,2})gb"
    r"(?P<attr>\+me\.all|\+me|-me|\+gfx)?"
)
_PROFILE_GRAMMAR = (
    "expected <G>g.<M>gb or <C>c.<G>g.<M>gb (e.g. 1g.5gb, 1c.2g.10gb), "
    "optionally followed by +me, +me.all, -me or +gfx"
)


@dataclass(frozen=True, slots=True)
class ProfileName:
    """A parsed MIG device name: ``<C>c.<G>g.<M>gb<attr>``.

    ``compute`` is None when the name has no ``<C>c.`` part, i.e. the compute instance spans the
    whole GPU instance (what "2g.10gb" means as a device).
    """

    gpu_slices: int
    memory_gb: int
    attr: str = ""
    compute: int | None = None

    @property
    def gi_name(self) -> str:
        """The GPU-instance profile's name as NVML reports it ("2g.10gb", "1g.5gb+me")."""
        return f"{self.gpu_slices}g.{self.memory_gb}gb{self.attr}"

    @property
    def partial(self) -> bool:
        """True when the compute instance covers only part of its GPU instance."""
        return self.compute is not None and self.compute < self.gpu_slices

    def __str__(self) -> str:
        """The canonical device name: "1c.1g.5gb" reads back as "1g.5gb"."""
        return f"{self.compute}c.{self.gi_name}" if self.partial else self.gi_name


def parse_profile(text: str) -> ProfileName:
    """Parse a device name from ``mig-devices``; ValueError with a readable reason otherwise."""
    match = _PROFILE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a MIG profile name; {_PROFILE_GRAMMAR}")
    gpu_slices = int(match["g"])
    compute = int(match["c"]) if match["c"] else None
    if compute is not None and compute > gpu_slices:
        raise ValueError(
            f"a compute instance of {compute} slices cannot sit in a GPU instance of {gpu_slices}"
        )
    return ProfileName(gpu_slices, int(match["m"]), match["attr"] or "", compute)


def layout_name(profile: str) -> str:
    """mig-parted's layout name for "all GPUs as ``profile``": ``+`` becomes ``.``
    ("1g.5gb+me" → "all-1g.5gb.me"), as its default file spells them."""
    return "all-" + profile.replace("+", ".")


# ---- the file's shape ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class PciFilter:
    """One ``device-filter`` item: NVML's combined ``0xDDDDVVVV`` and an optional subsystem.

    The subsystem part (``:0xSSSSssss``) is kept but not matched on: the hardware layer reports
    no subsystem ID, so a filter matches on device and vendor alone (looser than mig-parted).
    """

    device_id: int
    subsystem_id: int | None = None

    def __str__(self) -> str:
        text = f"0x{self.device_id:08X}"
        return text if self.subsystem_id is None else f"{text}:0x{self.subsystem_id:08X}"


@dataclass(frozen=True, slots=True)
class GpuTarget:
    """What one GPU should look like: MIG on or off and its devices as (name, count), sorted by
    name, zero counts dropped. Names are as the file spells them; :mod:`gpud.mig.fit` resolves
    them against the GPU's own profiles. ``named`` says the entry listed the GPU by index rather
    than as one of ``all``: mig-parted skips a GPU without MIG only in the second case."""

    enabled: bool
    devices: tuple[tuple[str, int], ...] = ()
    named: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class LayoutEntry:
    """One item of a named layout. ``devices`` None means ``all``; an empty ``device_filter``
    matches every board."""

    devices: tuple[int, ...] | None
    mig_enabled: bool
    mig_devices: tuple[tuple[str, int], ...] = ()
    device_filter: tuple[PciFilter, ...] = ()

    def matches(self, index: int, pci_device_id: int) -> bool:
        if self.devices is not None and index not in self.devices:
            return False
        return not self.device_filter or any(
            f.device_id == pci_device_id for f in self.device_filter
        )

    @property
    def target(self) -> GpuTarget:
        if not self.mig_enabled:
            return GpuTarget(False)
        counts: Counter[str] = Counter()
        for name, count in self.mig_devices:
            counts[name] += count
        return GpuTarget(True, tuple(sorted((n, c) for n, c in counts.items() if c > 0)))


@dataclass(frozen=True)
class LayoutFile:
    """A parsed mig-parted v1 file: named layouts (``mig-configs``) in file order."""

    configs: Mapping[str, tuple[LayoutEntry, ...]]
    source: str = "<layouts>"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.configs)


@dataclass  # not frozen: Python sets __traceback__ on exceptions it raises
class LayoutError(Exception):
    """The file (or a name in it) cannot be used; ``problems`` holds one "where: what" line each."""

    source: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        lines = "\n".join(f"  {p}" for p in self.problems)
        return f"{self.source}: invalid MIG layout file:\n{lines}"


class LayoutNotFound(LayoutError):
    """The file is fine but has no layout of the requested name."""

    def __str__(self) -> str:
        return f"{self.source}: {self.problems[0]}"


# ---- parsing ------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, line: int, key: object) -> None:
        super().__init__(f"line {line}: duplicate key {shown(key)}")


class _StrictLoader(bounded_yaml.BoundedLoader):
    """Refuses duplicate mapping keys: PyYAML would keep the last one silently, so a second
    ``all-balanced`` in a file would replace the first without anyone noticing."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; SafeLoader reports it itself
                break
            if duplicate:
                raise _DuplicateKey(key_node.start_mark.line + 1, key)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _typename(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _unknown(path: str, key: object, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(cut(str(key)), known, n=1)
    hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(known)
    return f"{path}: unknown field ({hint})"


_PCI_ID = re.compile(r"0x[0-9a-f]{8}(?::0x[0-9a-f]{8})?", re.IGNORECASE)


class _Parser:
    """Walks the YAML document once, collecting every problem with its path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def document(self, data: object) -> dict[str, tuple[LayoutEntry, ...]]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.problem(
                "(top level)",
                f"expected a mapping with version and mig-configs, got {_typename(data)}",
            )
            return {}
        for key in data:
            if key not in _TOP_KEYS:
                self.problems.append(_unknown(cut(str(key)), key, _TOP_KEYS))
        if "version" not in data:
            self.problem("version", f"required; this release reads 'version: {VERSION}'")
        elif data["version"] != VERSION:
            self.problem("version", f"must be {VERSION!r} (got {shown(data['version'])})")
        if "mig-configs" not in data:
            self.problem("mig-configs", "required: a mapping of layout names to lists of entries")
            return {}
        configs = data["mig-configs"]
        if not isinstance(configs, dict):
            self.problem(
                "mig-configs",
                f"expected a mapping of layout names to lists of entries, got {_typename(configs)}",
            )
            return {}
        out: dict[str, tuple[LayoutEntry, ...]] = {}
        for name, entries in configs.items():
            path = f"mig-configs.{cut(str(name))}"
            if not isinstance(name, str) or not name:
                hint = " (YAML reads on, off, yes and no as true or false: quote such a name)"
                self.problem(
                    path,
                    "a layout name must be a non-empty string"
                    + (hint if isinstance(name, bool) else ""),
                )
                continue
            if not isinstance(entries, list) or not entries:
                self.problem(
                    path,
                    f"expected a non-empty list of entries, got {_typename(entries)}"
                    if not isinstance(entries, list)
                    else "must list at least one entry",
                )
                continue
            parsed = [self.entry(f"{path}[{i}]", raw) for i, raw in enumerate(entries)]
            out[name] = tuple(e for e in parsed if e is not None)
        return out

    def entry(self, path: str, raw: object) -> LayoutEntry | None:
        if not isinstance(raw, dict):
            self.problem(
                path, f"expected a mapping with {', '.join(_ENTRY_KEYS)}, got {_typename(raw)}"
            )
            return None
        before = len(self.problems)
        for key in raw:
            if key not in _ENTRY_KEYS:
                self.problems.append(_unknown(f"{path}.{cut(str(key))}", key, _ENTRY_KEYS))
        devices = self.devices(f"{path}.devices", raw)
        enabled = raw.get("mig-enabled")
        if "mig-enabled" not in raw:
            self.problem(f"{path}.mig-enabled", "required (true or false)")
        elif not isinstance(enabled, bool):
            self.problem(f"{path}.mig-enabled", f"expected true or false, got {shown(enabled)}")
        mig_devices = self.mig_devices(f"{path}.mig-devices", raw, enabled)
        filters = self.device_filter(f"{path}.device-filter", raw.get("device-filter"))
        if len(self.problems) > before or not isinstance(enabled, bool):
            return None
        return LayoutEntry(devices, enabled, mig_devices, filters)

    def devices(self, path: str, raw: dict[Any, Any]) -> tuple[int, ...] | None:
        if "devices" not in raw:
            self.problem(path, 'required ("all" or a list of GPU indices)')
            return None
        value = raw["devices"]
        if value == "all":
            return None
        if not isinstance(value, list) or not value:
            self.problem(
                path, f'expected "all" or a non-empty list of GPU indices, got {shown(value)}'
            )
            return None
        indices: list[int] = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                self.problem(
                    f"{path}[{i}]", f"expected a GPU index (an integer >= 0), got {shown(item)}"
                )
            else:
                indices.append(item)
        return tuple(sorted(set(indices)))

    def mig_devices(
        self, path: str, raw: dict[Any, Any], enabled: object
    ) -> tuple[tuple[str, int], ...]:
        value = raw.get("mig-devices")
        if enabled is False:
            if value:
                self.problem(path, "must be empty or absent when mig-enabled is false")
            return ()
        if value is None:
            if enabled is True:
                self.problem(path, "required when mig-enabled is true (use {} for no devices)")
            return ()
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping of profile to count, got {_typename(value)}")
            return ()
        out: list[tuple[str, int]] = []
        for name, count in value.items():
            where = f"{path}.{cut(str(name))}"
            if not isinstance(name, str):
                self.problem(where, f"not a MIG profile name; {_PROFILE_GRAMMAR}")
                continue
            try:
                parse_profile(name)
            except ValueError as exc:
                self.problem(where, str(exc))
            if isinstance(count, bool) or not isinstance(count, int):
                self.problem(where, f"count must be a whole number (got {shown(count)})")
            elif count < 0:
                self.problem(where, f"count must be >= 0 (got {shown(count)})")
            elif count > MAX_COUNT:
                self.problem(
                    where,
                    f"count {shown(count)} is more than a GPU holds: no profile fits more than "
                    f"{MAX_COUNT} times on one GPU",
                )
            else:
                out.append((name, count))
        if value and all(count == 0 for _, count in out) and len(out) == len(value):
            self.problem(path, "at least one count must be > 0 (use {} for no devices)")
        return tuple(out)

    def device_filter(self, path: str, value: object) -> tuple[PciFilter, ...]:
        if value is None:
            return ()
        # YAML reads an unquoted 0x20B010DE as a number; take it as the ID it was meant to be.
        items = value if isinstance(value, list) else [value]
        if not items or not isinstance(value, (list, str, int)) or isinstance(value, bool):
            self.problem(
                path, f"expected a PCI ID string or a non-empty list of them, got {shown(value)}"
            )
            return ()
        out: list[PciFilter] = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if isinstance(value, list) else path
            number = isinstance(item, int) and not isinstance(item, bool)
            if number and 0xFFFF < item <= 0xFFFFFFFF:
                out.append(PciFilter(item))
                continue
            if not isinstance(item, str) or not _PCI_ID.fullmatch(item):
                echo = f"'0x{item:X}'" if number and 0 <= item <= 0xFFFFFFFFFFFF else shown(item)
                self.problem(
                    where,
                    f"{echo} is not a PCI ID; expected 0xDDDDVVVV (device then vendor, "
                    "e.g. 0x20B010DE), optionally followed by :0xSSSSssss",
                )
                continue
            device, _, subsystem = item.partition(":")
            out.append(PciFilter(int(device, 16), int(subsystem, 16) if subsystem else None))
        return tuple(out)


def parse(text: str, source: str = "<layouts>") -> LayoutFile:
    """Parse mig-parted v1 YAML (or JSON) text; LayoutError lists every problem found.

    Text over the bounds above is refused before it is parsed (size) or while it is (nesting,
    nodes), and a file that defines no layout is an error: an empty file must not stand for
    "the layouts I meant".
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_LAYOUT_BYTES:
        raise LayoutError(source, (too_large(size),))
    try:
        data = bounded_yaml.load(text, MAX_DEPTH, MAX_NODES, _StrictLoader)
    except (_DuplicateKey, bounded_yaml.BoundsError) as exc:
        raise LayoutError(source, (str(exc),)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise LayoutError(source, (f"{where}: not valid YAML: {cut(problem, 200)}",)) from None
    parser = _Parser()
    configs = parser.document(data)
    if not parser.problems and not configs:
        parser.problem(
            "mig-configs",
            "the file defines no layouts (it is empty, or mig-configs has no entries)",
        )
    if parser.problems:
        raise LayoutError(source, capped(parser.problems))
    return LayoutFile(configs, source)


def too_large(size: int) -> str:
    return (
        f"{size} bytes is more than the {MAX_LAYOUT_BYTES // 1024} KiB a layout file may have "
        "(mig-parted's default config has 12 KiB)"
    )


def capped(problems: Sequence[str]) -> tuple[str, ...]:
    """The first MAX_PROBLEMS problems, then how many more there were."""
    if len(problems) <= MAX_PROBLEMS:
        return tuple(problems)
    return (*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more problems")


def load(path: Path) -> LayoutFile:
    """Read and parse a layout file; unreadable files are a LayoutError like bad ones."""
    return parse(read_text(path), str(path))


def read_text(path: Path) -> str:
    """A layout file's text, refused without reading it all when it is over the size bound."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_LAYOUT_BYTES + 1)
            if len(raw) > MAX_LAYOUT_BYTES:
                f.seek(0, 2)
                raise LayoutError(str(path), (too_large(f.tell()),))
        return raw.decode("utf-8")
    except FileNotFoundError:
        raise LayoutError(str(path), ("file does not exist",)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError(str(path), (f"cannot read: {exc}",)) from None


def bundled_text() -> str:
    """The named layouts shipped with gpud (``gpud/mig/layouts.yaml``, made by
    scripts/gen-mig-layouts from the profile catalog)."""
    return resources.files("gpud.mig").joinpath("layouts.yaml").read_text(encoding="utf-8")


def bundled() -> LayoutFile:
    return parse(bundled_text(), "gpud/mig/layouts.yaml")


# ---- selection ----------------------------------------------------------------------------------


def select(config: LayoutFile, name: str, gpus: Sequence[tuple[int, int]]) -> dict[int, GpuTarget]:
    """The target of every GPU that layout ``name`` speaks about, by GPU index.

    ``gpus`` are (index, PCI device ID as NVML combines it). Entries are walked in file order and
    a later entry that matches a GPU replaces what an earlier one said, as mig-parted does; a GPU
    no entry matches is absent from the result (left alone). An entry's index list may name GPUs
    the node does not have; they are ignored, so one file serves nodes of different sizes. A
    ``device-filter`` matches on device and vendor only: the hardware layer reports no subsystem
    ID, so a ``:0xSSSSssss`` qualifier is accepted and ignored. Whether a selected GPU can do MIG
    at all is the fit check's question (:func:`gpud.mig.fit.resolve`), not this one's.
    """
    entries = config.configs.get(name)
    if entries is None:
        raise LayoutNotFound(config.source, (_not_found(name, config.names),))
    out: dict[int, GpuTarget] = {}
    for entry in entries:
        target = entry.target if entry.devices is None else replace(entry.target, named=True)
        for index, pci_device_id in gpus:
            if entry.matches(index, pci_device_id):
                out[index] = target
    return dict(sorted(out.items()))


def _not_found(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(cut(name), names, n=5, cutoff=0.5)
    ordered = [*close, *sorted(n for n in names if n not in close)]
    more = f" and {len(ordered) - 20} more" if len(ordered) > 20 else ""
    listed = ", ".join(cut(n) for n in ordered[:20])
    return f"no layout named {shown(name)}; available (closest first): {listed}{more}"


# ---- export -------------------------------------------------------------------------------------


def device_counts(state: MigLayoutState) -> tuple[tuple[str, int], ...]:
    """The GPU's MIG devices counted by name ("1g.5gb", "1c.2g.10gb"), sorted by name.

    A GPU instance without a compute instance is no device (nothing can use it), so it is not
    counted; the planner treats it as half-built.
    """
    gi_profiles = {p.profile_id: p for p in state.profiles}
    counts: Counter[str] = Counter()
    for gi in state.instances:
        profile = gi_profiles.get(gi.profile_id)
        if profile is None:
            raise ValueError(
                f"GPU {state.index}: GPU instance {gi.gi_id} has profile {gi.profile_id}, "
                "which the GPU does not report"
            )
        ci_names = {c.profile_id: c.name for c in profile.compute_profiles}
        for ci in gi.compute_instances:
            counts[ci_names.get(ci.profile_id, f"{ci.slices}c.{profile.name}")] += 1
    return tuple(sorted(counts.items()))


def export(states: Sequence[MigLayoutState], label: str = "current") -> str:
    """The node's current layout as a mig-parted v1 file with one layout, ``label``.

    One entry per MIG-capable GPU (by index) with its devices counted by name; a GPU whose MIG
    mode is off is ``mig-enabled: false``. GPUs without MIG are left out: there is nothing to
    say about them, and ``devices: all`` layouts skip them anyway. The current mode is written,
    not a pending one: that is what the devices reflect. Names are written as JSON strings, which
    YAML reads back unchanged.
    """
    if not label:
        raise ValueError("the layout label must not be empty")
    lines = [f"version: {VERSION}", "mig-configs:", f"  {json.dumps(label)}:"]
    entries = 0
    for state in sorted(states, key=lambda s: s.index):
        if state.mode.current is MigMode.UNSUPPORTED:
            continue
        entries += 1
        lines.append(f"    - devices: [{state.index}]")
        if state.mode.current is not MigMode.ENABLED:
            lines.append("      mig-enabled: false")
            continue
        lines.append("      mig-enabled: true")
        counts = device_counts(state)
        if not counts:
            lines.append("      mig-devices: {}")
            continue
        lines.append("      mig-devices:")
        lines.extend(f"        {json.dumps(name)}: {count}" for name, count in counts)
    if not entries:
        # mig-parted needs at least one entry per layout; "all, off" is true of a node without
        # MIG-capable GPUs and changes nothing there.
        lines += ["    - devices: all", "      mig-enabled: false"]
    return "\n".join(lines) + "\n"
