"""A clean Debian root booted with systemd as PID 1, to install and run the gpud package in.

``systemd-nspawn --boot --volatile=overlay`` keeps every write in a tmpfs above the cached root,
so the root stays clean for the next run. The host need not run systemd itself: ``--keep-unit``
and ``--register=no`` stop nspawn from asking a host systemd for a scope. Commands enter the
container's namespaces through ``nsenter`` on its PID 1 with a clean environment, so nothing of
the test process (PATH, the test venv, PYTHON* variables) leaks into what the package sees.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import time
from pathlib import Path

ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
    "HOME=/root",
]


# Each step inside a root has its own bound, well above what it takes on a loaded 2-core
# machine (an apt install that starts gpud: ~10 s idle), so a step that hangs fails naming itself
# long before the test's own timeout.
STEP_TIMEOUT = 300.0
BOOT_TIMEOUT = 180.0


def checked(
    result: subprocess.CompletedProcess[str], args: list[str], where: str
) -> subprocess.CompletedProcess[str]:
    """``result`` when it succeeded, else an assertion naming the command and its output."""
    if result.returncode != 0:
        raise AssertionError(
            f"{where}, {shlex.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def bounded(
    command: list[str], args: list[str], where: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (which runs ``args`` somewhere) for at most ``timeout`` seconds; past
    that, an assertion naming the step and what it had printed."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out, err = (
            data.decode(errors="replace") if isinstance(data, bytes) else data or ""
            for data in (exc.stdout, exc.stderr)
        )
        raise AssertionError(
            f"{where}, {shlex.join(args)} did not finish in {timeout:.0f} s\n"
            f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        ) from None


class BootFailed(RuntimeError):
    """systemd did not come up in the root (no nspawn, no privileges, or a broken root)."""


class Container:
    def __init__(self, root: Path, binds: dict[Path, str], log: Path) -> None:
        self.root = root
        self.binds = binds
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        cmd = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            "--boot",
            "--keep-unit",
            "--register=no",
            "--volatile=overlay",
            "--machine=gpud-package-test",
        ]
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootFailed(f"systemd-nspawn exited {self.proc.returncode}: {self._log()}")
            if not self.pid:
                self.pid = self._container_init()
            if self.pid:
                wait = ["systemctl", "is-system-running", "--wait"]
                left = max(1.0, deadline - time.monotonic())
                with contextlib.suppress(AssertionError):  # past the deadline: BootFailed below
                    state = self.run(wait, check=False, timeout=left)
                    if state.stdout.strip() in ("running", "degraded"):
                        return
            time.sleep(0.2)
        self.close()
        raise BootFailed(f"systemd did not reach running in {timeout:.0f} s: {self._log()}")

    def _container_init(self) -> int:
        """The container's PID 1, seen from the host: nspawn's child once it runs systemd."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return 0

    def _log(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def run(
        self,
        args: list[str],
        *,
        check: bool = True,
        timeout: float = STEP_TIMEOUT,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside, as root or as ``user`` (with that user's groups)."""
        inner = ["env", "-i", *ENV, *args]
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        command = ["nsenter", "-t", str(self.pid), "-a", *inner]
        result = bounded(command, args, "in the container", timeout)
        return checked(result, args, "in the container") if check else result

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def write(self, path: str, text: str) -> None:
        """Write a file inside (through the container, so the overlay gets it, not the cache)."""
        parent = shlex.quote(str(Path(path).parent))
        script = f"mkdir -p {parent}; printf '%s' {shlex.quote(text)} > {shlex.quote(path)}"
        self.run(["sh", "-ec", script])

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.pid:
            self.run(["systemctl", "poweroff"], check=False, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
