"""The seam holds in the imports: the daemon knows no publisher, publishers know no daemon, and
nothing imports in a circle through the daemon (DESIGN.md, "One node state, many publishers").

Every ``import`` of a gpud module counts, wherever it is written: at the top, inside a function
(the lazy import that used to hide the circle between daemon.py and api.py) or under
TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gpud"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@cache
def graph() -> dict[str, frozenset[str]]:
    """gpud module -> the gpud modules it imports anywhere in its source."""
    out: dict[str, frozenset[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gpud"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpud"):
                base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if _is_module(sub) else base)
        out[_module(path)] = frozenset(m for m in found if m in _known())
    return out


@cache
def _known() -> frozenset[str]:
    return frozenset(_module(p) for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts)


def reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph().get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_daemon_and_the_control_api_import_nothing_in_a_circle() -> None:
    for module in ("gpud.daemon.daemon", "gpud.daemon.api", "gpud.deviceplugin.publisher"):
        assert module not in reachable(module), f"{module} imports itself through a circle"


def test_the_daemon_imports_no_publisher() -> None:
    below = reachable("gpud.daemon.daemon")
    publishers = sorted(
        m
        for m in below
        if m.startswith(("gpud.deviceplugin", "gpud.cli")) or m in ("gpud.daemon.api",)
    )
    assert publishers == []


def test_the_node_state_imports_neither_the_daemon_nor_any_publisher() -> None:
    modules = sorted(m for m in _known() if m.startswith("gpud.node."))
    assert "gpud.node.state" in modules and "gpud.node.hub" in modules
    for module in modules:
        reached = reachable(module)
        wrong = sorted(m for m in reached if m.startswith(("gpud.daemon", "gpud.deviceplugin")))
        assert wrong == [], f"{module} reaches {wrong}"


def test_loading_the_daemon_loads_no_publisher() -> None:
    probe = (
        "import sys, gpud.daemon.daemon\n"
        "print(sorted(m for m in sys.modules if m.startswith('gpud.deviceplugin') "
        "or m == 'gpud.daemon.api'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
