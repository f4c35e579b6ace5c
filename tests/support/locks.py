"""Real dpkg/apt locks for the host-setup tests: a process that holds one, and real apt-get.

``LockHolder`` is a separate process holding a POSIX record lock (``fcntl``, as dpkg and apt take
them) on a lock file under a fake root, started under the name unattended-upgrades has in
``/proc/PID/comm`` (``unattended-upgr``), so what gpud reports is what an operator would see.
``real_apt_get`` runs the machine's own apt-get against that root's dpkg and apt directories,
so apt's own ``DPkg::Lock::Timeout`` wait is the real one.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import unavailable

APT_GET = "/usr/bin/apt-get"
DPKG = "/usr/bin/dpkg"
HOLDER_NAME = "unattended-upgr"

# argv: lock file, seconds, and a file to create once locked ("-": say so on stdout, and let go
# early when stdin closes).
_HOLD = """
import fcntl, os, select, sys, time
path, seconds, ready = sys.argv[1], float(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX)
deadline = time.monotonic() + seconds
if ready != "-":
    open(ready, "w").close()
    time.sleep(seconds)
    sys.exit()
print("locked", flush=True)
while (left := deadline - time.monotonic()) > 0:
    if select.select([sys.stdin], [], [], left)[0] and not sys.stdin.read(1):
        break
"""


class LockHolder:
    """Holds ``path`` (a lock file on the fake node) until :meth:`release`, or for ``seconds``.

    It also lets go when its stdin closes, so a holder is never left behind by a failed test.
    """

    def __init__(
        self, path: Path, seconds: float = 600.0, *, scratch: Path, name: str = HOLDER_NAME
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [holder_program(scratch, name), "-c", _HOLD, str(path), str(seconds), "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", line
        self.path = path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_program(scratch: Path, name: str = HOLDER_NAME) -> str:
    """This Python under another process's name (a symlink in ``scratch``): by default the name
    unattended-upgrades' process has."""
    named = scratch / name
    if not named.exists():
        named.symlink_to(Path(sys.executable).resolve())
    return str(named)


def take_lock_for(path: Path, seconds: float, scratch: Path) -> str:
    """Shell lines that start a holder of ``path`` for ``seconds`` in the background and go on
    once it holds the lock: for a fake tool that must lose a race to another process."""
    ready = scratch / f"{path.name}.held"
    q = shlex.quote
    return (
        f"/bin/rm -f {q(str(ready))}\n"
        f"{q(holder_program(scratch))} -c {q(_HOLD)} {q(str(path))} {seconds} {q(str(ready))}"
        " </dev/null >/dev/null 2>&1 &\n"
        f"while [ ! -e {q(str(ready))} ]; do /bin/sleep 0.05; done\n"
    )


def apt_root(root: Path) -> None:
    """The dpkg and apt directories apt-get needs under ``root`` (an empty package database)."""
    for d in (
        "var/lib/dpkg/updates",
        "var/lib/dpkg/info",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/log/apt",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()


def real_apt_get(root: Path) -> str:
    """A shell command that runs the machine's apt-get on ``root``'s dpkg/apt directories.

    Append apt's options and verb. apt-get must run as root to take the locks (as on a node).
    """
    apt_root(root)
    if not Path(APT_GET).exists() or not Path(DPKG).exists():
        unavailable("apt-get and dpkg are not installed here")
    r = str(root)
    opts = [
        f"Dir::State::status={r}/var/lib/dpkg/status",
        f"Dir::State={r}/var/lib/apt",
        f"Dir::Cache={r}/var/cache/apt",
        f"Dir::Log={r}/var/log/apt",
        "Dir::Etc::sourcelist=/dev/null",
        "Dir::Etc::sourceparts=/dev/null",
        "Dir::Etc::preferencesparts=/dev/null",
        f"Dir::Bin::dpkg={DPKG}",
    ]
    return " ".join([APT_GET, *(f"-o {shlex.quote(o)}" for o in opts)])


def real_apt_with_gpud_options(root: Path, verb: str = "check") -> str:
    """Fake apt-get lines that first do what locking a real apt-get does: run the real apt-get
    (``check`` takes dpkg's frontend and database locks, ``update`` the lists lock) with the
    ``-o`` options gpud passed, so apt's own ``DPkg::Lock::Timeout`` wait happens, or apt fails
    with its own "Could not get lock" and the fake exits with apt's status."""
    return (
        'opts=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "-o" ] && opts="$opts -o $a"; prev="$a"; done\n'
        f"{real_apt_get(root)} $opts {verb} >/dev/null || exit $?\n"
    )
