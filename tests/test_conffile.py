"""packaging/gpud.yaml, installed as the conffile /etc/gpud/gpud.yaml.

Installing the package must change nothing (the file is the defaults), the file must stay the
complete reference an operator edits (every key of the schema is in it), and each commented-out
setting must work once its "# " is deleted, as the file's header promises.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from gpud.config.load import load, parse
from gpud.config.models import Config, default_config
from gpud.hw.sim.machines import parse_spec
from gpud.mig import layout

CONFFILE = Path(__file__).resolve().parents[1] / "packaging" / "gpud.yaml"
LINES = CONFFILE.read_text(encoding="utf-8").splitlines()
# The file's convention: "##" starts an explanation, "# " a setting at its real indentation.
PROSE, SETTING = "##", "# "
ACTIVE = "version: v1"


@dataclass(frozen=True)
class KeyLine:
    number: int  # index into LINES
    indent: int  # column of the key, or of the "- " when the line starts a list entry
    path: str  # e.g. "sharing.timeSlicing.resources[].name"


def key_lines(lines: list[str]) -> list[KeyLine]:
    """The commented-out settings, each with its key path (list entries as "[]")."""
    found: list[KeyLine] = []
    open_keys: list[tuple[int, str]] = []  # (indent, path) of the keys enclosing this line
    for number, line in enumerate(lines):
        if not line.startswith(SETTING):
            continue
        text = line[len(SETTING) :]
        body = text.lstrip()
        indent = len(text) - len(body)
        while open_keys and open_keys[-1][0] >= indent:
            open_keys.pop()
        parent = open_keys[-1][1] if open_keys else ""
        key_indent = indent
        if body.startswith("- "):
            parent += "[]"
            open_keys.append((indent, parent))
            body, key_indent = body[2:], indent + 2
        path = f"{parent}.{body.split(':', 1)[0]}" if parent else body.split(":", 1)[0]
        found.append(KeyLine(number, indent, path))
        open_keys.append((key_indent, path))
    return found


KEYS = key_lines(LINES)


def schema(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every key path the model reads, spelt as in YAML, mapped to whether it is required."""
    paths: dict[str, bool] = {}
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        paths[path] = field.is_required()
        for sub, suffix in _models_in(field.annotation):
            paths |= schema(sub, f"{path}{suffix}.")
    return paths


def _models_in(annotation: object, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        yield from _models_in(item, suffix + "[]")
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, suffix
    else:  # X | None; the arguments of Literal[...] and of plain types hold no models
        for arg in get_args(annotation):
            yield from _models_in(arg, suffix)


SCHEMA = schema(Config)


def uncomment(numbers: Iterable[int]) -> str:
    chosen = set(numbers)
    return "\n".join(line[len(SETTING) :] if n in chosen else line for n, line in enumerate(LINES))


def block(key: KeyLine) -> list[int]:
    """The line of ``key`` and the lines nested under it."""
    numbers = [key.number]
    for other in KEYS:
        if other.number > key.number:
            if other.indent <= key.indent:
                break
            numbers.append(other.number)
    return numbers


def enclosing(key: KeyLine) -> list[KeyLine]:
    """The section lines above ``key``, outermost first."""
    chain: list[KeyLine] = []
    indent = key.indent
    for other in reversed(KEYS[: KEYS.index(key)]):
        if other.indent < indent:
            chain.insert(0, other)
            indent = other.indent
    return chain


def parent_path(path: str) -> str:
    return path.rpartition(".")[0]


def to_uncomment(key: KeyLine) -> set[int]:
    """What the header tells an operator to uncomment to use ``key``: its block, the section
    lines above it, and the required keys beside it or beside any of those sections."""
    chain = [*enclosing(key), key]
    numbers = set(block(key)) | {k.number for k in chain}
    for outer, inner in zip([None, *chain[:-1]], chain, strict=True):
        beside = block(outer) if outer is not None else range(len(LINES))
        for other in KEYS:
            # .get: a key the schema lacks fails test_every_key_of_the_schema_is_documented,
            # and must not fail every other key's test here too.
            if (
                other.number in beside
                and SCHEMA.get(other.path, False)
                and parent_path(other.path) == parent_path(inner.path)
            ):
                numbers |= set(block(other))
    return numbers


def test_every_line_is_explanation_setting_or_the_version() -> None:
    # Anything else (a bare "#key", a tab) would break the mechanical uncommenting the header
    # promises.
    odd = [
        f"{n + 1}: {line}"
        for n, line in enumerate(LINES)
        if line and not line.startswith((PROSE, SETTING)) and line != ACTIVE
    ]
    assert odd == []
    assert [line for line in LINES if line == ACTIVE] == [ACTIVE]


def test_installing_the_file_changes_nothing() -> None:
    cfg = load(CONFFILE)
    assert cfg == default_config()
    # Nothing is set explicitly either: an NVIDIA plugin file named later overrides without
    # warnings about values the operator never chose.
    assert cfg.model_fields_set == {"version"}


def test_every_key_of_the_schema_is_documented() -> None:
    documented = {k.path for k in KEYS} | {"version"}
    assert set(SCHEMA) - documented == set(), "document the new keys in packaging/gpud.yaml"
    assert documented - set(SCHEMA) == set(), "packaging/gpud.yaml documents unknown keys"


def test_every_setting_uncommented_at_once_is_valid() -> None:
    cfg = parse(uncomment(k.number for k in KEYS), str(CONFFILE))
    # The loader leaves these strings to the code that uses them, so check them as it will.
    assert cfg.simulate is not None
    parse_spec(cfg.simulate)
    assert cfg.mig.layout in layout.bundled().names


@pytest.mark.parametrize("key", KEYS, ids=[f"line{k.number + 1}:{k.path}" for k in KEYS])
def test_each_setting_uncommented_alone_is_valid(key: KeyLine) -> None:
    parse(uncomment(to_uncomment(key)), str(CONFFILE))


def test_gpud_config_validate_accepts_the_file(tmp_path: Path) -> None:
    gpud = Path(sys.executable).parent / "gpud"
    out = subprocess.run(
        [str(gpud), "config", "validate", str(CONFFILE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.strip() == f"{CONFFILE}: valid"
