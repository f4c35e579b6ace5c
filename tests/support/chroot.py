"""The same clean root as a chroot with no init running: an image being built, or a machine
that cannot boot systemd in a container.

An overlay keeps the cached root clean, as ``--volatile=overlay`` does for nspawn. /proc, /sys
and /dev are bound in so apt, dpkg and the daemon work; /run is an empty tmpfs, so
``/run/systemd/system`` is absent and the maintainer scripts behave as they do without systemd
running (units enabled, nothing started).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.nspawn import ENV, STEP_TIMEOUT, bounded, checked


class Chroot:
    def __init__(self, root: Path, binds: dict[Path, str], work: Path) -> None:
        self.lower = root
        self.binds = binds
        self.work = work
        self.path = work / "merged"
        self._mounts: list[Path] = []

    def __enter__(self) -> Chroot:
        for d in ("upper", "work", "merged"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={self.lower},upperdir={self.work / 'upper'},workdir={self.work / 'work'}"
        self._mount(["-t", "overlay", "overlay", "-o", opts], self.path)
        for api in ("proc", "sys", "dev"):
            self._mount(["--rbind", f"/{api}"], self.path / api, private=True)
        self._mount(["-t", "tmpfs", "tmpfs"], self.path / "run")
        for host, inside in self.binds.items():
            target = self.path / inside.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            self._mount(["--bind", "-o", "ro", str(host)], target)
        return self

    def _mount(self, args: list[str], target: Path, private: bool = False) -> None:
        subprocess.run(["mount", *args, str(target)], check=True)
        if private:
            subprocess.run(["mount", "--make-rslave", str(target)], check=True)
        self._mounts.append(target)

    def __exit__(self, *exc: object) -> None:
        for target in reversed(self._mounts):
            subprocess.run(["umount", "--recursive", "--lazy", str(target)], check=False)
        self._mounts.clear()

    def command(self, args: list[str]) -> list[str]:
        """The host command that runs ``args`` inside, with a clean environment."""
        return ["chroot", str(self.path), "env", "-i", *ENV, *args]

    def run(
        self, args: list[str], *, check: bool = True, timeout: float = STEP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        result = bounded(self.command(args), args, "in the chroot", timeout)
        return checked(result, args, "in the chroot") if check else result
