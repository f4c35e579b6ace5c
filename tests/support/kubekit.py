"""A real API server for tests: shared/tools/kube/kubekit (etcd and kube-apiserver on loopback,
Node authorizer and NodeRestriction as kubeadm runs them, the Node ``gpu-node-1`` and its
kubelet's kubeconfig). See shared/tools/kube/README.md."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.conftest import SHARED_FIXTURES, unavailable

KUBEKIT = SHARED_FIXTURES.parent / "tools" / "kube" / "kubekit"


class Cluster:
    """One kubekit control plane in ``root``; :meth:`up` and :meth:`down` may repeat (the ports
    and the etcd data stay, so a restarted API server is the same cluster)."""

    def __init__(self, root: Path, apiserver_args: str = "", with_parts: str = "") -> None:
        self.root = root
        # Extra kube-apiserver flags (KUBEKIT_APISERVER_ARGS), kept for every up().
        self.apiserver_args = apiserver_args
        # Extra control-plane parts (KUBEKIT_WITH: "scheduler,claims" for DRA allocation).
        self.with_parts = with_parts
        self.node = "gpu-node-1"
        self.admin = root / "admin.kubeconfig"
        self.node_kubeconfig = root / "node.kubeconfig"
        self.bin: Path | None = None

    def _kit(self, *args: str) -> str:
        env = dict(
            os.environ,
            KUBEKIT_DOWN_SIGNAL="KILL",
            KUBEKIT_APISERVER_ARGS=self.apiserver_args,
            KUBEKIT_WITH=self.with_parts,
        )
        out = subprocess.run(
            [str(KUBEKIT), *args], capture_output=True, text=True, timeout=180, env=env
        )
        if out.returncode != 0:
            raise AssertionError(f"kubekit {' '.join(args)} failed: {out.stderr[-3000:]}")
        return out.stdout

    def up(self) -> None:
        self._kit("up", str(self.root))
        for line in (self.root / "kubekit.env").read_text().splitlines():
            if line.startswith("export KUBEKIT_BIN="):
                self.bin = Path(line.split("=", 1)[1].split()[0].strip('"'))

    def down(self) -> None:
        self._kit("down", str(self.root))

    def add_node(self, name: str) -> Path:
        self._kit("add-node", str(self.root), name)
        return self.root / "nodes" / f"{name}.kubeconfig"

    def kubectl(self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None) -> str:
        assert self.bin is not None
        out = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(kubeconfig or self.admin), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def labels(self, node: str | None = None) -> dict[str, str]:
        """The Node's labels as the administrator reads them."""
        obj = json.loads(self.kubectl("get", "node", node or self.node, "-o", "json"))
        return dict(obj["metadata"].get("labels") or {})

    def wait_labels(
        self, check: Callable[[dict[str, str]], bool], timeout: float = 20.0, what: str = ""
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            labels = self.labels()
            if check(labels):
                return labels
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or 'labels'}: {labels}")
            time.sleep(0.2)

    def events(self) -> list[dict[str, Any]]:
        """gpud's Events about the Node, oldest first."""
        out = self.kubectl(
            "get", "events", "-n", "default", "-o", "json",
            "--field-selector", f"involvedObject.kind=Node,involvedObject.name={self.node}",
        )  # fmt: skip
        found = [e for e in json.loads(out)["items"] if e.get("reportingComponent") == "gpud"]
        return sorted(found, key=lambda e: e["metadata"]["name"])

    def wait_events(
        self, check: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events()
            if check(found):
                return found
            if time.monotonic() > deadline:
                shown = [(e["reason"], e["message"][:120]) for e in found]
                raise AssertionError(f"no {what} within {timeout} s: {shown}")
            time.sleep(0.05)


def cluster(root: Path, apiserver_args: str = "", with_parts: str = "") -> Cluster:
    """A started cluster in ``root``; unavailable (skip, or fail under CI) without kubekit.
    ``with_parts`` "scheduler,claims" adds kube-scheduler and the ResourceClaim controller."""
    if not KUBEKIT.exists():
        unavailable(f"{KUBEKIT} is not beside this checkout")
    for tool in ("xz", "openssl"):
        if shutil.which(tool) is None:
            unavailable(f"kubekit needs {tool}")
    found = Cluster(root, apiserver_args, with_parts)
    found.up()
    return found


@contextlib.contextmanager
def running(prefix: str, apiserver_args: str = "", with_parts: str = "") -> Iterator[Cluster]:
    """A started cluster in a fresh directory (``prefix``), stopped and removed afterwards: what
    a test module's ``kube`` fixture yields."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        found = cluster(root, apiserver_args, with_parts)
        try:
            yield found
        finally:
            found.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)
