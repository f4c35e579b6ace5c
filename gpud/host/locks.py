"""Who holds a lock file, and waiting for dpkg's and apt's locks instead of failing on them.

On a fresh Ubuntu node unattended-upgrades often holds dpkg's lock for minutes exactly when
cloud-init runs ``gpud bootstrap``, and every apt command then fails with "Could not get lock".
apt-get can wait by itself (``-o DPkg::Lock::Timeout=N``), but only for dpkg's locks: not for the
lists lock ``apt-get update`` takes, and ``ubuntu-drivers`` has no such option at all (it runs
apt-get without one). So before each apt or ubuntu-drivers command gpud looks at the locks itself
and waits, bounded, while another process holds one, naming that process.

dpkg and apt take POSIX record locks (``fcntl(F_SETLK)``) on these files. ``F_GETLK`` asks who
holds one without taking it: taking it ourselves would block the very tool we are waiting for.
The same probe names the holder of gpud bootstrap's own run lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpud.host.commands import CommandRunner
from gpud.host.platform import under

# In the order apt takes them (the frontend lock first), so the first one held is the one that
# blocks the next command.
APT_LOCKS = (
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/lock",
    "/var/lib/apt/lists/lock",
    "/var/cache/apt/archives/lock",
)
DEFAULT_TIMEOUT = 600
"""Seconds each command waits: bounded, so that a stuck apt fails the setup naming itself instead
of hanging it (``apt.lockTimeout``, ``--lock-timeout`` change it)."""
POLL_INTERVAL = 0.5
REPORT_EVERY = 30.0
LOCKED = 75
"""The exit status of a command gpud did not start because a lock stayed held (EX_TEMPFAIL)."""
RACE_RETRIES = 2
"""Runs again after the command lost the lock to another process between gpud's look and its
own start; bounded, since a lock gpud cannot see (another root) would never come free."""

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi"
# apt's errors when a lock stays held ("E: ..."); apt also prints "Waiting for cache lock: Could
# not get lock ..." while it waits and then succeeds, which must not count as a failure.
_LOCK_ERROR = re.compile(
    r"^E: (?:Could not get lock|Unable to acquire the dpkg frontend lock|Unable to lock)",
    re.MULTILINE,
)
_APT_HOLDER = re.compile(r"It is held by process (?P<pid>\d+)(?: \((?P<comm>[^)]*)\))?")


@dataclass(frozen=True)
class Holder:
    """A process holding a lock file: ``pid`` 0 when the lock is held but the pid is unknown
    (an open-file-description lock, or a process in another PID namespace)."""

    path: str
    pid: int
    command: str | None

    def __str__(self) -> str:
        if not self.pid:
            return "a process gpud cannot name"
        return f"{self.command or 'an exited process'} (pid {self.pid})"


def holder_pid(path: Path) -> int | None:
    """The pid holding a write-conflicting lock on ``path``; 0 when held by an unknown pid;
    None when nothing holds one (or the file is missing or unreadable: then nothing can be
    known, and waiting for it would only delay)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        reply = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError:
        return None
    finally:
        os.close(fd)
    l_type, _, _, _, pid = struct.unpack(_FLOCK, reply)
    if l_type == fcntl.F_UNLCK:
        return None
    return max(pid, 0)


def process_name(pid: int) -> str | None:
    """The kernel's name for ``pid`` (``/proc/PID/comm``, at most 15 characters:
    ``unattended-upgr``); None when it has exited."""
    if pid <= 0:
        return None
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def holder_of(root: Path, path: str) -> Holder | None:
    pid = holder_pid(under(root, path))
    if pid is None:
        return None
    return Holder(path, pid, process_name(pid))


def apt_lock_holder(root: Path, paths: Sequence[str] = APT_LOCKS) -> Holder | None:
    """The first of dpkg's and apt's locks that a process holds, and that process."""
    for path in paths:
        found = holder_of(root, path)
        if found is not None:
            return found
    return None


def wait_for_apt_locks(
    root: Path,
    timeout: float,
    progress: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Holder | None:
    """Return None once none of the locks is held, or the holder when ``timeout`` seconds have
    passed.

    Polling (every half second) is what a lock held by another process allows: waiting on the
    lock itself would take it. ``progress`` hears who holds it when the wait starts, when the
    holder changes and every half minute.
    """
    start = clock()
    reported: Holder | None = None
    last_report = start
    while True:
        holder = apt_lock_holder(root)
        now = clock()
        if holder is None or now - start >= timeout:
            return holder
        if reported is None or (holder.path, holder.pid) != (reported.path, reported.pid):
            progress(f"waiting for {holder.path}, held by {holder} (up to {timeout:g} s)")
            reported, last_report = holder, now
        elif now - last_report >= REPORT_EVERY:
            progress(f"still waiting for {holder.path}, held by {holder} ({now - start:.0f} s)")
            last_report = now
        sleep(min(POLL_INTERVAL, max(timeout - (now - start), 0.0)))


def apt_lock_option(timeout: float) -> tuple[str, str]:
    """apt-get's own wait for dpkg's locks, for a lock taken between gpud's look and apt's."""
    return ("-o", f"DPkg::Lock::Timeout={int(timeout)}")


def lock_failure(output: str) -> bool:
    """Whether apt (run directly or by ubuntu-drivers) gave up on a lock."""
    return _LOCK_ERROR.search(output) is not None


def holder_from_apt(output: str, path: str) -> Holder | None:
    """The holder apt named in its error ("It is held by process 812 (unattended-upgr)")."""
    m = _APT_HOLDER.search(output)
    if not m:
        return None
    return Holder(path, int(m.group("pid")), m.group("comm") or None)


def run_when_unlocked(
    run: CommandRunner,
    argv: Sequence[str],
    timeout: float,
    root: Path,
    lock_timeout: float,
    progress: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[subprocess.CompletedProcess[str], Holder | None]:
    """Run ``argv`` once the apt locks are free; again when it lost a race for them.

    Returns the command's result and, when a lock kept it from working (it did not start
    because the locks stayed held past ``lock_timeout``: exit status :data:`LOCKED`; or it ran
    and gave up on a lock), who held it. ``timeout`` is the command's own limit; the lock wait
    is added to it, since apt-get waits too.
    """
    deadline = clock() + lock_timeout
    for attempt in range(RACE_RETRIES + 1):
        held = wait_for_apt_locks(root, max(deadline - clock(), 0.0), progress, clock=clock)
        if held is not None:
            why = f"{held.path} is still held by {held} after {lock_timeout:g} s"
            return subprocess.CompletedProcess(list(argv), LOCKED, "", f"{why}\n"), held
        result = run(list(argv), timeout + lock_timeout)
        output = f"{result.stdout}\n{result.stderr}"
        if not lock_failure(output):
            return result, None
        holder = (
            apt_lock_holder(root)
            or holder_from_apt(output, APT_LOCKS[0])
            or Holder(APT_LOCKS[0], 0, None)
        )
        if attempt == RACE_RETRIES or clock() >= deadline:
            return result, holder
        progress(f"{_tool(argv)} lost the dpkg lock to {holder}; waiting to run it again")
    raise AssertionError("unreachable: the last attempt returns")


def lock_fix(holder: Holder) -> str:
    """What to do about a lock that stayed held."""
    return (
        f"wait for {holder} to finish (on a new node usually unattended-upgrades: systemctl "
        "status unattended-upgrades apt-daily-upgrade), then run this again; or wait longer "
        "(gpudctl: --lock-timeout; gpud bootstrap: apt.lockTimeout)"
    )


def _tool(argv: Sequence[str]) -> str:
    """The program ``argv`` runs, past ``/usr/bin/env VAR=value``."""
    words = [w for w in argv if Path(w).name != "env" and "=" not in w]
    return Path(words[0]).name if words else "the command"


@contextmanager
def exclusive(path: Path) -> Iterator[Holder | None]:
    """Hold a write lock on ``path`` for the block; yields the other holder instead when one
    has it (the block then runs without the lock: the caller decides what to do).

    The pid is written into the file for people reading it; the lock itself is the truth, so a
    file left behind by a killed process never blocks anyone. It is a POSIX record lock, so that
    another process's F_GETLK names this one's pid; POSIX drops such a lock when the process
    closes any descriptor of the file, so nothing else in it may open the file meanwhile.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = holder_pid(path) or 0
            yield Holder(str(path), pid, process_name(pid))
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield None
    finally:
        os.close(fd)
