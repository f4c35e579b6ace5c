"""Clean Debian roots for the package tests, made once by debootstrap and then reused.

A root is never written after it is made: the tests boot it with ``--volatile=overlay`` (or
mount an overlay on it for the chroot fallback), so every run starts from the same clean system
and the cache under ``.cache/debroot`` saves the ~50 s of debootstrap per release on later runs.

Debian 12 (bookworm, python3 3.11, systemd 252) and Debian 13 (trixie, python3 3.13, systemd
257) are the releases the one .deb is installed into; Ubuntu's archive is not reachable from
where gpud is tested, and its python3 versions (3.10, 3.12) are covered by running the
package's payload under those CPythons.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEBIAN_12 = "bookworm"
DEBIAN_13 = "trixie"
# What a minimal systemd host needs for the tests: systemd to boot, dbus for systemctl, and the
# python3 the package depends on.
INCLUDE = "systemd,systemd-sysv,dbus,python3"
FALLBACK_MIRROR = "http://deb.debian.org/debian/"
# debootstrap downloads and unpacks ~200 packages: about a minute on an idle machine.
DEBOOTSTRAP_TIMEOUT = 1200.0


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses, so the root comes from the same place."""
    out = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI)"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return next((uri for uri in out if uri.rstrip("/").endswith("/debian")), FALLBACK_MIRROR)


def ensure_root(cache: Path, suite: str = DEBIAN_12) -> Path:
    """Return a complete root of ``suite`` under ``cache``, running debootstrap only when there
    is none.

    A root is complete only once debootstrap succeeded (the marker), so an interrupted run is
    redone rather than reused half-made.
    """
    root = cache / suite
    marker = cache / f"{suite}.complete"
    if marker.exists() and (root / "usr/bin/python3").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    cmd = ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", suite, str(root)]
    try:
        result = subprocess.run(
            [*cmd, apt_mirror()],
            capture_output=True,
            text=True,
            check=False,
            timeout=DEBOOTSTRAP_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"debootstrap {suite} did not finish in {DEBOOTSTRAP_TIMEOUT:.0f} s"
        ) from None
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"debootstrap {suite} failed ({result.returncode}):\n{tail}")
    marker.write_text(suite + "\n")
    return root
