"""Fake host trees and fake executables for the host-setup tests.

``FakeTools`` writes small ``/bin/sh`` scripts into a bin directory that tests put first (and
only) on ``PATH``: each records its argv to a log and answers with recorded output (golden files
under ``tests/golden/host``), so the real command runner is exercised end to end.
"""

from __future__ import annotations

import shlex
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "host"


def golden(name: str) -> str:
    return (GOLDEN / name).read_text(encoding="utf-8")


class FakeTools:
    def __init__(self, base: Path) -> None:
        self.bin = base / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log = base / "calls.log"

    def add(self, name: str, stdout: str = "", stderr: str = "", rc: int = 0) -> None:
        """``name`` prints ``stdout``/``stderr`` and exits ``rc``, logging its argv."""
        out, err = self.bin / f".{name}.out", self.bin / f".{name}.err"
        out.write_text(stdout, encoding="utf-8")
        err.write_text(stderr, encoding="utf-8")
        log = shlex.quote(str(self.log))
        script = self.bin / name
        script.write_text(
            "#!/bin/sh\n"
            f'for a in "$0" "$@"; do printf "%s\\037" "$a"; done >> {log}\n'
            f'printf "\\036" >> {log}\n'
            f"/bin/cat {shlex.quote(str(out))}\n"
            f"/bin/cat {shlex.quote(str(err))} >&2\n"
            f"exit {rc}\n",
            encoding="utf-8",
        )
        script.chmod(0o755)

    def add_golden(self, name: str, stem: str, rc: int = 0) -> None:
        """Answer with ``<stem>.out`` and ``<stem>.err`` from the golden directory, if present."""
        out, err = GOLDEN / f"{stem}.out", GOLDEN / f"{stem}.err"
        self.add(
            name,
            out.read_text(encoding="utf-8") if out.exists() else "",
            err.read_text(encoding="utf-8") if err.exists() else "",
            rc,
        )

    def add_script(self, name: str, body: str) -> None:
        """``name`` logs its argv like :meth:`add`, then runs ``body`` (``/bin/sh``).

        For tools whose answer depends on earlier calls (``apt-get install`` then ``dpkg-query``):
        the body reads and writes a state directory of the test's choosing.
        """
        log = shlex.quote(str(self.log))
        script = self.bin / name
        script.write_text(
            "#!/bin/sh\n"
            f'for a in "$0" "$@"; do printf "%s\\037" "$a"; done >> {log}\n'
            f'printf "\\036" >> {log}\n' + body + "\n",
            encoding="utf-8",
        )
        script.chmod(0o755)

    def calls(self) -> list[list[str]]:
        """Every recorded call, argv[0] reduced to the tool's name."""
        if not self.log.exists():
            return []
        calls = []
        # \x1f ends each argument and \x1e each call: arguments may hold newlines (dpkg's -f)
        for record in self.log.read_text(encoding="utf-8").split("\x1e")[:-1]:
            argv = record.split("\x1f")[:-1]
            calls.append([Path(argv[0]).name, *argv[1:]])
        return calls

    @property
    def path(self) -> str:
        return str(self.bin)


def write(root: Path, path: str, text: str = "") -> Path:
    """Create ``path`` (absolute on the fake system) under ``root`` with ``text``."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target


def mkdir(root: Path, path: str) -> Path:
    target = root / path.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    return target
