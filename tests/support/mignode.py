"""A node for MIG tests: gpud on a simulated machine, kubelet's device manager and, as a real
kubelet has, its PodResources API, each a real process or server on real unix sockets.

gpud refuses to destroy MIG instances when kubelet is installed but cannot be asked which pods
hold them, so a node that stands for a Kubernetes node serves PodResources (with no pods unless a
test adds some); a test of that refusal leaves it out, and a node "without kubelet" has neither.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.node import Node, make_node
from tests.support.podresources import FakePodResources


@dataclass
class MigNode(Node):
    podres: FakePodResources | None = None

    @property
    def podres_socket(self) -> Path:
        return self.root / "podres" / "kubelet.sock"

    def state(self) -> dict[str, Any]:
        """``gpudctl mig show -o json``."""
        code, state = self.mig("show")
        assert code == 0, state
        return state

    def instances(self) -> dict[int, list[tuple[str, str]]]:
        """Per GPU index, its MIG devices as sorted (profile, placement)."""
        return {
            g["index"]: sorted((i["profile"], i["placement"]) for i in g["instances"])
            for g in self.state()["gpus"]
        }

    def health(self) -> dict[str, str]:
        """Every GPU's health as ``gpudctl devices -o json`` reports it, by UUID."""
        out = self.gpudctl("-o", "json", "devices")
        assert out.returncode == 0, out.stderr
        return {g["uuid"]: g["health"] for g in json.loads(out.stdout)}

    def stop(self) -> None:
        if self.gpud.running():
            self.gpud.terminate()
        self.kubelet.stop()
        if self.podres is not None:
            self.podres.stop()


def start(
    root: Path,
    spec: str,
    config: str = "version: v1\n",
    *,
    kubelet: bool = True,
    podres: bool = True,
) -> MigNode:
    """gpud on ``spec`` with ``config`` (plus the PodResources socket path), ready.

    ``kubelet`` False: no kubelet at all (its directories do not exist). ``podres`` False: kubelet
    runs but its PodResources API does not (the socket is missing).
    """
    plain = make_node(root, spec)
    node = MigNode(plain.root, plain.kubelet, plain.gpud)
    (root / "gpud.yaml").write_text(
        config + f"paths:\n  podResourcesSocket: {node.podres_socket}\n"
    )
    node.gpud.extra += ["--config", str(root / "gpud.yaml")]
    if kubelet:
        node.kubelet.start()
        if podres:
            node.podres = FakePodResources(node.podres_socket).start()
    node.gpud.start()
    node.gpud.wait_ready()
    return node


@contextlib.contextmanager
def stopped_after() -> Iterator[list[MigNode]]:
    """Collects the nodes a test starts and stops them at the end, printing each daemon's log
    (pytest shows it when the test failed)."""
    started: list[MigNode] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()
            print(node.gpud.log())
