"""The installed console scripts work from anywhere, not only from the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpud import __version__

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["gpud", "gpudctl"])
def test_console_script_runs_outside_the_checkout(script: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / script), "--help"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "exit status: 0 success, 1 failure, 2 invalid input" in out.stdout


def test_gpud_version(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "gpud"), "--version"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"gpud {__version__}"
