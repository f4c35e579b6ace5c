"""gpud.host.locks against real locks: a process holding them, and apt's own words about them.

What gpud reads here is what dpkg and apt do on a node, so the locks are real ``fcntl`` locks
held by another process, and the texts are those the real apt-get prints, not copies of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpud.host.locks import (
    apt_lock_holder,
    exclusive,
    holder_from_apt,
    lock_failure,
    wait_for_apt_locks,
)
from tests.support.locks import HOLDER_NAME, LockHolder, real_apt_get


def apt(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", f"{real_apt_get(root)} {' '.join(args)}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_holder_of_each_apt_lock_is_named(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert apt_lock_holder(root) is None  # no lock files at all
    for path in ("var/lib/apt/lists/lock", "var/lib/dpkg/lock-frontend"):
        with LockHolder(root / path, scratch=tmp_path) as holder:
            found = apt_lock_holder(root)
            assert found is not None and found.path == f"/{path}"
            assert (found.pid, found.command) == (holder.pid, HOLDER_NAME)
            assert str(found) == f"{HOLDER_NAME} (pid {holder.pid})"
        assert apt_lock_holder(root) is None  # the file stays; the lock went with its process


def test_the_wait_ends_when_the_holder_lets_go_and_reports_it_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    heard: list[str] = []
    with LockHolder(root / "var/lib/dpkg/lock", 1.0, scratch=tmp_path) as holder:
        assert wait_for_apt_locks(root, 60, heard.append) is None
    assert heard == [
        f"waiting for /var/lib/dpkg/lock, held by {HOLDER_NAME} (pid {holder.pid}) (up to 60 s)"
    ]
    with LockHolder(root / "var/lib/dpkg/lock", scratch=tmp_path) as holder:
        still = wait_for_apt_locks(root, 0.5, heard.append)
    assert still is not None and still.pid == holder.pid


def test_apt_s_words_a_failure_and_a_wait_that_succeeded(tmp_path: Path) -> None:
    """apt prints "Could not get lock" both when it gives up and while it waits and then
    succeeds; only the first is a failure."""
    root = tmp_path / "root"
    frontend = root / "var/lib/dpkg/lock-frontend"
    with LockHolder(frontend, scratch=tmp_path) as holder:
        failed = apt(root, "check")
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and lock_failure(output)
    named = holder_from_apt(output, "/var/lib/dpkg/lock-frontend")
    assert named is not None and (named.pid, named.command) == (holder.pid, HOLDER_NAME)
    with LockHolder(frontend, 1.5, scratch=tmp_path):
        waited = apt(root, "-o DPkg::Lock::Timeout=60", "check")
    output = waited.stdout + waited.stderr
    assert waited.returncode == 0 and "Could not get lock" in output
    assert not lock_failure(output)


def test_one_holder_of_an_exclusive_lock_and_the_other_is_told_who(tmp_path: Path) -> None:
    lock = tmp_path / "state" / "bootstrap.lock"
    other = (
        "import sys; from pathlib import Path; from gpud.host.locks import exclusive\n"
        "with exclusive(Path(sys.argv[1])) as held:\n"
        "    print(held.pid if held else 'free')\n"
    )
    with exclusive(lock) as held:
        assert held is None
        busy = subprocess.run(
            [sys.executable, "-c", other, str(lock)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert busy.stdout.strip() == str(os.getpid())
    # read only now: closing any descriptor of the file in this process would drop its lock
    assert lock.read_text() == f"{os.getpid()}\n"
    free = subprocess.run(
        [sys.executable, "-c", other, str(lock)], capture_output=True, text=True, timeout=60
    )
    assert free.stdout.strip() == "free"
