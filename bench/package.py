"""The installed package under systemd: how fast gpud.service becomes active, and what it costs.

Builds the .deb from this checkout (scripts/build-deb) unless ``--deb`` names one, boots the
cached clean Debian 12 root of the package test (``--release 13``: the Debian 13 one, another
python3 and so another of the payload's compiled-module directories) with systemd-nspawn,
installs it with apt and configures the simulated dgx-a100. Then ``systemctl restart gpud`` N
times; each start is measured by systemd itself, from ``ExecMainStartTimestampMonotonic`` (the
process exec'd) to ``ActiveEnterTimestampMonotonic`` (READY=1 received), so it includes the
interpreter, the imports from the postinst-compiled bytecode, the backend and the plugin
sockets, and nothing of this script. RSS is the daemon's VmRSS after it idled ``--idle``
seconds. The budgets are the ones bench/startup.py and bench/idle.py report against; here they
hold for the installed form.

Needs root, debootstrap and systemd-nspawn (scripts/setup installs them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, emit, log, summary_ms
from tests.support.debroot import DEBIAN_12, DEBIAN_13, ensure_root
from tests.support.nspawn import Container

CONFIG = "version: v1\nbackend: sim\nsimulate: dgx-a100\n"
RELEASES = {"12": DEBIAN_12, "13": DEBIAN_13}


def _show(node: Container, prop: str) -> str:
    return node.run(["systemctl", "show", "gpud", f"--property={prop}", "--value"]).stdout.strip()


def _build(out: Path) -> Path:
    log("building the .deb")
    result = subprocess.run(
        [str(REPO / "scripts/build-deb"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="an already built gpud .deb")
    parser.add_argument("--runs", type=int, default=20, help="restarts to time")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle before RSS")
    parser.add_argument("--release", choices=RELEASES, default="12", help="Debian release")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gb-package-") as tmp:
        work = Path(tmp)
        deb = args.deb.resolve() if args.deb else _build(work)
        root = ensure_root(REPO / ".cache/debroot", RELEASES[args.release])
        node = Container(root, {deb.parent: "/mnt/dist"}, work / "nspawn.log")
        node.boot()
        try:
            started = time.monotonic()
            node.run(["apt-get", "--yes", "--quiet", "install", f"/mnt/dist/{deb.name}"])
            install_s = time.monotonic() - started
            python3 = node.run(["python3", "--version"]).stdout.split()[1]
            node.write("/etc/gpud/gpud.yaml", CONFIG)
            starts = []
            for _ in range(args.runs):
                # Not systemd's start rate limit (5 starts in 10 s) being measured here.
                node.run(["systemctl", "reset-failed", "gpud"])
                node.run(["systemctl", "restart", "gpud"])
                begin = int(_show(node, "ExecMainStartTimestampMonotonic"))
                ready = int(_show(node, "ActiveEnterTimestampMonotonic"))
                starts.append((ready - begin) / 1e6)
            log(f"{args.runs} starts timed; idling {args.idle:g} s")
            time.sleep(args.idle)
            pid = _show(node, "MainPID")
            status = node.run(["cat", f"/proc/{pid}/status"]).stdout
            rss_kib = next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
            )
        finally:
            node.close()
        size = deb.stat().st_size
        installed = subprocess.run(
            ["dpkg-deb", "--field", str(deb), "Installed-Size"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    start = summary_ms(starts)
    emit(
        "package",
        {
            "start_to_ready_p50_ms": start["p50"],
            "start_to_ready_max_ms": start["max"],
            "rss_after_idle_mib": round(rss_kib / 1024, 1),
            "apt_install_s": round(install_s, 2),
            "deb_mib": round(size / 2**20, 2),
            "installed_mib": round(int(installed) / 1024, 1),
        },
        {"start_to_ready_p50_ms": 400, "rss_after_idle_mib": 60},
        start_to_ready_ms=start,
        python3=python3,
        method=f"systemd's own timestamps in a booted Debian {args.release} root "
        "(systemd-nspawn), dgx-a100 sim",
    )


if __name__ == "__main__":
    main()
