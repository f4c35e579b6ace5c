"""The node labels as a running gpud publishes them: NFD's feature file and ``gpudctl labels``.

gpud runs as a real process on the simulated machines (tests/support/node.py) with its NFD
directory in the test's own tree. What nfd-worker would notice is observed with inotify, which
its fsnotify watch on ``features.d`` is built on: every replace of the file is one ``MOVED_TO``.
The expected values are GFD's for these boards (shared/reference/cluster-integration.md §2).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncinotify import Inotify, Mask

from gpud._proto.gpud.v1 import gpud_pb2
from tests.support import mignode
from tests.support.mignode import MigNode
from tests.support.node import Node
from tests.test_labels_gfd import versions

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"


def gfd(product: str, memory: str, family: str, major: str) -> dict[str, str]:
    """GFD's whole-GPU labels for 8 GPUs under gpud's default (mixed, no sharing), on the
    simulated backend, whose machine type and PCI classes are not the host's (unknown)."""
    return {
        **versions(),
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": memory,
        "nvidia.com/gpu.family": family,
        "nvidia.com/gpu.compute.major": major,
        "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.machine": "unknown",
        "nvidia.com/gpu.mode": "unknown",
        "nvidia.com/mig.capable": "true",
        "nvidia.com/mig.strategy": "mixed",
        "nvidia.com/mps.capable": "false",
    }


BOARDS = {
    "dgx-a100": gfd("NVIDIA-A100-SXM4-40GB", "40960", "ampere", "8"),
    "dgx-h100": gfd("NVIDIA-H100-80GB-HBM3", "81559", "hopper", "9"),
}
STATIC = {"example.com/accelerator": "nvidia", "accelerator": "nvidia"}
STATIC_YAML = "labels:\n  static:\n    example.com/accelerator: nvidia\n    accelerator: nvidia\n"


def nfd_read(path: Path) -> dict[str, str]:
    """The labels nfd-worker reads from a feature file: ``key=value`` lines, comments skipped."""
    pairs = (
        line.strip().partition("=")
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key: value for key, _, value in pairs}


def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def labels_publisher(node: Node) -> gpud_pb2.Publisher:
    return next(p for p in node.gpud.status().publishers if p.name == "labels")


def gpudctl_labels(node: Node, user: int | None = None) -> dict[str, Any]:
    out = node.gpudctl("labels", "-o", "json", user=user)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Writes:
    """Every replace, creation and removal of the feature file nfd-worker's watch would see."""

    def __init__(self, directory: Path) -> None:
        self._inotify = Inotify()
        self._inotify.add_watch(directory, Mask.MOVED_TO | Mask.CREATE | Mask.DELETE)
        self._inotify.sync_timeout = 0.05

    def seen(self) -> list[Mask]:
        events = []
        while (event := self._inotify.sync_get()) is not None:
            if str(event.name) == "gpud":
                events.append(event.mask)
        return events

    def close(self) -> None:
        self._inotify.close()


def start(root: Path, spec: str = "dgx-a100", config: str = "", nfd: bool = True) -> MigNode:
    """gpud with ``config`` in its gpud.yaml and ``root/nfd`` as NFD's directory (made first, as
    NFD's worker would, unless ``nfd`` is False), beside kubelet and its PodResources API."""
    if nfd:
        (root / "nfd").mkdir(exist_ok=True)
    return mignode.start(root, spec, "version: v1\n" + config)


def reconfigure(node: MigNode, config: str) -> None:
    """Rewrite gpud.yaml (keeping the PodResources socket) and reload it as systemctl would."""
    paths = f"paths:\n  podResourcesSocket: {node.podres_socket}\n"
    (node.root / "gpud.yaml").write_text("version: v1\n" + config + paths)
    out = node.gpudctl("config", "reload")
    assert out.returncode == 0, out.stderr


@pytest.fixture
def nodes() -> Iterator[list[MigNode]]:
    with mignode.stopped_after() as started:
        yield started


def published(node: Node) -> dict[str, str]:
    """The feature file's labels once gpud has written it."""
    path = node.root / "nfd" / "gpud"
    wait_for(path.exists, f"{path}")
    return nfd_read(path)


@pytest.mark.parametrize("spec", sorted(BOARDS))
def test_gfd_labels_and_static_ones_in_the_file_and_from_gpudctl(
    short_tmp: Path, nodes: list[MigNode], spec: str
) -> None:
    node = start(short_tmp, spec, STATIC_YAML)
    nodes.append(node)
    path = short_tmp / "nfd" / "gpud"
    assert published(node) == {**BOARDS[spec], **STATIC}

    # gpudctl labels says exactly what the file says, and where; anyone on the socket may ask.
    node.root.chmod(0o755)
    for user in (None, 65534):
        assert gpudctl_labels(node, user) == {"labels": nfd_read(path), "nfd_file": str(path)}
    text = node.gpudctl("labels")
    assert text.returncode == 0, text.stderr
    assert "nvidia.com/gpu.count=8\n" in text.stdout and str(path) in text.stdout

    # The label without a prefix is written, and status says what nfd-master will make of it.
    publisher = labels_publisher(node)
    assert publisher.state == "ok"
    assert f"labels in {path}" in publisher.detail
    assert "feature.node.kubernetes.io/accelerator" in publisher.detail


def test_a_restart_keeps_the_file_and_does_not_rewrite_it(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp)
    nodes.append(node)
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    path = short_tmp / "nfd" / "gpud"
    wait_for(lambda: published(node).get("nvidia.com/mig-1g.5gb.count") == "56", "MIG labels")
    before = path.stat()
    text = path.read_text()

    writes = Writes(short_tmp / "nfd")
    try:
        node.gpud.terminate()
        assert path.read_text() == text  # the labels outlive gpud
        node.gpud.start()
        node.gpud.wait_ready()
        wait_for(lambda: "labels in" in labels_publisher(node).detail, "the labels publisher")
        assert writes.seen() == []
    finally:
        writes.close()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert gpudctl_labels(node)["labels"] == nfd_read(path)


@pytest.mark.parametrize("strategy", ["mixed", "single"])
def test_a_mig_layout_change_rewrites_the_file_once(
    short_tmp: Path, nodes: list[MigNode], strategy: str
) -> None:
    node = start(short_tmp, config=f"devicePlugin:\n  migStrategy: {strategy}\n")
    nodes.append(node)
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    assert published(node)["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"

    if strategy == "mixed":
        key, want = "nvidia.com/mig-1g.5gb.count", "56"
    else:
        key, want = "nvidia.com/gpu.product", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    writes = Writes(short_tmp / "nfd")
    try:
        code, out = node.mig("apply", "-c", "all-1g.5gb")
        assert code == 0, out
        wait_for(lambda: published(node).get(key) == want, f"{key}={want}")
        # Applying it again changes nothing, and the file stays as it is.
        assert node.mig("apply", "-c", "all-1g.5gb")[1]["result"] == "unchanged"
        wait_for(lambda: gpudctl_labels(node)["labels"] == published(node), "the publisher")
        time.sleep(0.5)
        assert writes.seen() == [Mask.MOVED_TO]
    finally:
        writes.close()
    labels = published(node)
    assert labels["nvidia.com/gpu.count"] == ("8" if strategy == "mixed" else "56")
    assert gpudctl_labels(node)["labels"] == labels


def test_reload_applies_the_labels_settings(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp)
    nodes.append(node)
    path = short_tmp / "nfd" / "gpud"
    assert "example.com/rack" not in published(node)

    reconfigure(node, "labels:\n  static:\n    example.com/rack: r12\n")
    wait_for(lambda: published(node).get("example.com/rack") == "r12", "the static label")

    reconfigure(node, "labels:\n  enabled: false\n")
    wait_for(lambda: not path.exists(), "the file to go")
    assert gpudctl_labels(node) == {"labels": {}, "nfd_file": None}
    assert "labels.enabled is false" in labels_publisher(node).detail

    assert node.gpud.running()


def test_without_nfd_nothing_is_written_and_status_says_why(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, nfd=False)
    nodes.append(node)
    wait_for(lambda: "does not exist" in labels_publisher(node).detail, "the publisher")
    publisher = labels_publisher(node)
    assert publisher.state == "ok" and str(short_tmp / "nfd") in publisher.detail
    answer = gpudctl_labels(node)
    assert answer["nfd_file"] is None
    assert answer["labels"] == BOARDS["dgx-a100"]
    assert not (short_tmp / "nfd").exists()
    text = node.gpudctl("labels").stdout
    assert "NFD feature file: none" in text and "does not exist" in text


def test_an_unwritable_directory_degrades_the_labels_only(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    nfd = short_tmp / "nfd"
    nfd.mkdir()
    # Read-only for root too, as gpud's systemd sandbox makes /etc.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(nfd)], check=True)
    try:
        node = start(short_tmp)
        nodes.append(node)
        wait_for(lambda: labels_publisher(node).state == "degraded", "the publisher to degrade")
        publisher = labels_publisher(node)
        assert "Read-only file system" in publisher.error and str(nfd / "gpud") in publisher.error
        table = node.gpudctl("status").stdout
        assert "degraded (" in table and "retry in" in table
        assert gpudctl_labels(node)["nfd_file"] is None

        # kubelet is served all the while.
        devices = node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
        uuid = sorted(devices)[0]
        assert node.kubelet.allocate(GPU, [uuid]).envs["NVIDIA_VISIBLE_DEVICES"] == uuid

        # Writable again: the retry (with backoff) publishes, with no restart.
        subprocess.run(["mount", "-o", "remount,rw", str(nfd)], check=True)
        wait_for(lambda: labels_publisher(node).state == "ok", "the publisher to recover")
        assert published(node) == BOARDS["dgx-a100"]
    finally:
        subprocess.run(["umount", "--lazy", str(nfd)], check=False)


def test_the_file_is_kept_while_the_gpus_cannot_be_read(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp)
    nodes.append(node)
    path = short_tmp / "nfd" / "gpud"
    labels = published(node)
    before = path.stat()
    node.gpud.terminate()

    # The same node with the driver gone (this machine has none: the nvml backend fails).
    node.gpud.extra += ["--backend", "nvml"]
    node.gpud.start()
    assert node.gpud.wait_ready().backend_error
    detail = f"{len(labels)} labels in {path} kept while the GPUs cannot be read (no driver"
    wait_for(lambda: labels_publisher(node).detail.startswith(detail), "the publisher")
    assert gpudctl_labels(node) == {"labels": labels, "nfd_file": str(path)}
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
