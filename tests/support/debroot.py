"""A clean Debian 12 root for the package tests, made once by debootstrap and then reused.

The root is never written after it is made: the tests boot it with ``--volatile=overlay`` (or
mount an overlay on it for the chroot fallback), so every run starts from the same clean system
and the cache under ``.cache/debroot`` saves the ~50 s of debootstrap on later runs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
# What a minimal systemd host needs for the tests: systemd to boot, dbus for systemctl, and the
# python3 the package depends on (python3-venv is not needed: the venv is built at package time).
INCLUDE = "systemd,systemd-sysv,dbus,python3"
FALLBACK_MIRROR = "http://deb.debian.org/debian/"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses, so the root comes from the same place."""
    out = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return next((uri for uri in out if uri.rstrip("/").endswith("/debian")), FALLBACK_MIRROR)


def ensure_root(cache: Path) -> Path:
    """Return a complete root under ``cache``, running debootstrap only when there is none.

    A root is complete only once debootstrap succeeded (the marker), so an interrupted run is
    redone rather than reused half-made.
    """
    root = cache / SUITE
    marker = cache / f"{SUITE}.complete"
    if marker.exists() and (root / "usr/bin/python3").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    cmd = ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(root)]
    result = subprocess.run(
        [*cmd, apt_mirror()], capture_output=True, text=True, check=False, timeout=600
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"debootstrap failed ({result.returncode}):\n{tail}")
    marker.write_text(SUITE + "\n")
    return root
