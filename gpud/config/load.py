"""Reading a config file into :class:`gpud.config.models.Config`, with errors a person can act on.

Every problem comes back as one line "key.path: message", whether the file is not YAML, has an
unknown key, or a value of the wrong type, so ``gpud config validate`` can print them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpud.config.models import Config, default_config

DEFAULT_CONFIG_PATH = Path("/etc/gpud/gpud.yaml")


@dataclass(frozen=True)
class ConfigError(Exception):
    """The file could not be used; ``problems`` holds one "where: what" line each."""

    path: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        lines = "\n".join(f"  {p}" for p in self.problems)
        return f"{self.path}: invalid configuration:\n{lines}"


def key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """A YAML document that must be a mapping (empty: {}); ConfigError saying where it is not."""
    import yaml  # only when there is a file: a node without one starts without the YAML parser

    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, (f"{where}: not valid YAML: {problem}",)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, (f"(top level): expected a mapping, got {type(data).__name__}",))
    return data


def validation_problems(exc: ValidationError) -> tuple[str, ...]:
    """pydantic's errors as "key.path: message (got value)" lines."""
    return tuple(
        f"{key_path(tuple(err['loc']))}: {err['msg']}"
        + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
        for err in exc.errors()
    )


def parse(text: str, source: str = "<config>") -> Config:
    """Parse YAML text; an empty document means all defaults (``version`` is still required)."""
    data = yaml_mapping(text, source)
    if "version" not in data:
        raise ConfigError(source, ("version: required; this release reads 'version: v1'",))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None


def load(path: Path | None) -> Config:
    """Load ``path``; a missing default file means defaults, a missing named file is an error."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return default_config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ("file does not exist",)) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), (f"cannot read: {exc}",)) from None
    return parse(text, str(path))
