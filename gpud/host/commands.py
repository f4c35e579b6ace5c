"""Running host tools (dpkg-query, systemctl, mokutil, …) behind one small seam.

Host setup only ever runs a handful of commands, and the answers are facts to parse, not
failures to raise: a missing ``mokutil`` means "Secure Boot unknown", not a crash. So the runner
never raises; it returns a :class:`subprocess.CompletedProcess` whose ``returncode`` follows the
shell's conventions (127 not found, 126 not executable, 124 timed out) with the reason on stderr.
Tests pass their own runner, or put fake executables first on ``PATH`` for the real one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

CommandRunner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]

NOT_FOUND, NOT_EXECUTABLE, TIMED_OUT = 127, 126, 124


def run_command(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` without a shell, capture text output, and never raise.

    The environment (``PATH`` included) is inherited, which is what lets tests substitute tools.
    ``LC_ALL=C`` is not forced: callers parse formats that are not localised (dpkg's ``-f``,
    ``systemctl is-active``), and operators' messages stay in their language.
    """
    args = list(argv)
    try:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(args, NOT_FOUND, "", f"{args[0]}: command not found\n")
    except PermissionError as exc:
        return subprocess.CompletedProcess(args, NOT_EXECUTABLE, "", f"{args[0]}: {exc}\n")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(
            args, TIMED_OUT, "", f"{args[0]}: no answer within {timeout:g}s\n"
        )
    except OSError as exc:
        return subprocess.CompletedProcess(args, NOT_EXECUTABLE, "", f"{args[0]}: {exc}\n")


def missing(result: subprocess.CompletedProcess[str]) -> bool:
    """Whether the command could not be started at all (not installed)."""
    return result.returncode == NOT_FOUND
