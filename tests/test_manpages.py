"""The man pages document what the parsers define, and render without a warning.

The pages are written by hand, so nothing else stops a new command or option from shipping
undocumented, or a removed one from staying in the page. The rendering check is the one
lintian makes (its groff-message and manpage-has-errors-from-man tags come from groff's
warnings), done here so that a page is fixed before a package is built.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from gpud.cli.completion import PROGRAMS, Command, walk

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "packaging/man"

_ESCAPES = re.compile(r"\\f[BIRP]|\\[&%|c]")


def plain(roff: str) -> str:
    """The words a reader sees, near enough to look for names: no font changes, real hyphens."""
    return _ESCAPES.sub("", roff).replace("\\-", "-")


def sections(prog: str) -> dict[str, str]:
    """Each heading (.SH or .SS) of the page with the text under it, up to the next heading."""
    out: dict[str, str] = {}
    heading = None
    for line in plain((MAN / f"{prog}.8").read_text(encoding="ascii")).splitlines():
        if line.startswith((".SH ", ".SS ")):
            heading = line[4:].strip().strip('"')
            assert heading not in out, f"{heading!r} twice in {prog}.8"
            out[heading] = ""
        elif heading is not None:
            out[heading] += line + "\n"
    return out


def tree(prog: str) -> list[Command]:
    return list(walk(PROGRAMS[prog](), prog))


def section_of(path: str, page: dict[str, str]) -> str:
    found = [text for head, text in page.items() if head == path or head.startswith(path + " ")]
    assert len(found) == 1, f"{path}: {len(found)} sections, want one headed '{path} ...'"
    return found[0]


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_every_command_has_its_section_and_no_other(prog: str) -> None:
    page = sections(prog)
    leaves = [c.path for c in tree(prog) if not c.subcommands]
    for path in leaves:
        section_of(path, page)
    documented = [head for head in page if head.startswith(prog + " ")]
    stale = [h for h in documented if not any(h == p or h.startswith(p + " ") for p in leaves)]
    assert stale == [], "commands the parser no longer has"


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_every_long_option_is_documented_where_it_belongs(prog: str) -> None:
    page = sections(prog)
    top, *commands = tree(prog)
    missing = [o for o in top.options if o.startswith("--") and not mentions(page["OPTIONS"], o)]
    for command in commands:
        options = [o for o in command.options if o.startswith("--") and o != "--help"]
        if command.subcommands:
            # A group such as "gpudctl mig" has no section of its own to document options in.
            assert options == [], f"{command.path}: give its options a place in the page"
            continue
        text = section_of(command.path, page)
        missing += [f"{command.path} {o}" for o in options if not mentions(text, o)]
    assert missing == []


def test_every_environment_variable_read_is_documented() -> None:
    read = re.compile(r"""(?:environ(?:\.get|\.setdefault)?[(\[]|getenv\()\s*["']([A-Z_]+)["']""")
    names = {
        name
        for source in (ROOT / "gpud").rglob("*.py")
        if "_proto" not in source.parts
        for name in read.findall(source.read_text(encoding="utf-8"))
    }
    assert "GPUD_SOCKET" in names  # the pattern still finds what the CLIs read
    documented = "".join(sections(prog)["ENVIRONMENT"] for prog in PROGRAMS)
    assert sorted(n for n in names if not mentions(documented, n)) == []


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_page_renders_without_warnings(prog: str) -> None:
    out = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / f"{prog}.8")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert (out.returncode, out.stderr) == (0, "")
