"""A node under test: gpud as a real process beside a fake kubelet, and gpudctl to drive it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.kubelet import FakeKubelet
from tests.support.process import GpudProcess
from tests.support.unprivileged import readable_client


@dataclass
class Node:
    root: Path
    kubelet: FakeKubelet
    gpud: GpudProcess

    def gpudctl(self, *args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
        """gpudctl against this node's gpud, as root or as ``user`` (a uid: run from a copy that
        user can read, so only gpud can refuse it; see tests/support/unprivileged.py)."""
        client = ["-m", "gpud.cli.gpudctl", "--socket", str(self.gpud.socket), *args]
        if user is None:
            argv, env, cwd = [sys.executable, *client], None, None
        else:
            readable = readable_client()
            argv, env, cwd = readable.argv(user, *client), readable.env, "/"
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, env=env, cwd=cwd
        )

    def uuids(self) -> list[str]:
        return [g.uuid for g in self.gpud.status().gpus]

    def mig(self, *args: str) -> tuple[int, dict[str, Any]]:
        """``gpudctl mig ARGS -o json``: exit code and the parsed answer."""
        out = self.gpudctl("mig", *args, "-o", "json")
        try:
            return out.returncode, json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"not JSON: {out.stdout!r} {out.stderr!r}") from None


def make_node(root: Path, spec: str = "dgx-a100", extra: tuple[str, ...] = ()) -> Node:
    kubelet = FakeKubelet(root / "kubelet")
    # Never the host's NFD directory; a test's own --nfd-dir in ``extra`` comes later and wins.
    extra = ("--nfd-dir", str(root / "nfd"), *extra)
    gpud = GpudProcess(
        spec, root / "kubelet", root / "state", root / "gpud.sock", extra, log_dir=root / "log"
    )
    return Node(root, kubelet, gpud)
