"""Bash completion: the committed scripts match the parsers, and real bash completes with them.

The scripts are sourced into ``bash --norc --noprofile``, where the bash-completion package's
helpers do not exist, because that is what a minimal node without that package gives them.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPLETION = ROOT / "packaging/completion"

# Sources the script, sets up the words as bash would for the line, and calls the function that
# `complete -p` says is registered for the program (so the registration is tested too).
_HARNESS = r"""
source "$1"
shift
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
spec=$(complete -p "$1")
fn=${spec#*-F }
fn=${fn%% *}
"$fn" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def complete(*words: str, cwd: Path = ROOT) -> list[str]:
    """What bash offers with the cursor at the end of the last word (``""``: after a space)."""
    script = str(COMPLETION / words[0])
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", _HARNESS, "bash", script, *words],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr == ""
    return sorted(line for line in out.stdout.splitlines() if line)


def test_committed_scripts_match_the_parsers(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen-completion"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "packaging/completion"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in COMPLETION.iterdir())
    stale = [n for n in names if not filecmp.cmp(fresh / n, COMPLETION / n, shallow=False)]
    assert stale == [], "run scripts/gen-completion and commit the result"


def test_top_level_commands() -> None:
    assert complete("gpudctl", "") == [
        "config",
        "debug",
        "device",
        "devices",
        "doctor",
        "dra",
        "driver",
        "labels",
        "mig",
        "platform",
        "status",
        "toolkit",
        "top",
    ]
    assert complete("gpud", "") == ["bootstrap", "config", "run"]


def test_nested_commands_and_their_options() -> None:
    assert complete("gpudctl", "mig", "") == ["apply", "assert", "export", "show", "validate"]
    assert complete("gpudctl", "mig", "apply", "-") == [
        "--config-file",
        "--config-name",
        "--dry-run",
        "--force",
        "--help",
        "--output",
        "-c",
        "-f",
        "-h",
        "-o",
    ]
    assert complete("gpudctl", "mig", "apply", "--d") == ["--dry-run"]
    assert complete("gpudctl", "dra", "") == ["manifests"]
    assert complete("gpudctl", "dra", "manifests", "--d") == ["--driver-name"]


def test_option_values_are_its_choices() -> None:
    assert complete("gpudctl", "status", "-o", "") == ["json", "table", "yaml"]
    assert complete("gpudctl", "mig", "export", "-o", "") == ["json", "yaml"]
    # `--output=j`: bash splits the word at '=', as COMP_WORDBREAKS says.
    assert complete("gpudctl", "status", "--output", "=", "j") == ["json"]
    assert complete("gpudctl", "status", "--output", "=") == ["json", "table", "yaml"]


def test_an_option_value_is_not_taken_for_a_command() -> None:
    # A socket named "mig": the next word is a top-level command, not one of mig's.
    assert "status" in complete("gpudctl", "--socket", "mig", "")
    assert complete("gpudctl", "--socket", "/tmp/gpud.sock", "mig", "") == [
        "apply",
        "assert",
        "export",
        "show",
        "validate",
    ]


def test_file_arguments_complete_file_names(tmp_path: Path) -> None:
    for name in ("gpud.yaml", "gpud-test.yaml", "layouts.yaml"):
        (tmp_path / name).touch()
    (tmp_path / "gpud.d").mkdir()
    assert complete("gpudctl", "config", "validate", "gpud", cwd=tmp_path) == [
        "gpud-test.yaml",
        "gpud.d",
        "gpud.yaml",
    ]
    assert complete("gpudctl", "mig", "apply", "-f", "lay", cwd=tmp_path) == ["layouts.yaml"]
    assert complete("gpud", "run", "--state-dir", "gpud", cwd=tmp_path) == ["gpud.d"]


def test_values_nothing_can_guess_complete_nothing() -> None:
    assert complete("gpudctl", "device", "set-healthy", "") == []
    assert complete("gpudctl", "debug", "inject-xid", "--gpu", "") == []
