"""``gpudctl debug set-load`` through a running gpud: the load reaches the simulated GPUs, bad
input exits 2 and changes nothing, and the setting outlives a restart of gpud."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.hw.sim.backend import SimBackend
from tests.support.mignode import MigNode, start, stopped_after
from tests.support.node import Node, make_node

pytestmark = pytest.mark.integration


@pytest.fixture
def node(short_tmp: Path) -> Iterator[Node]:
    n = make_node(short_tmp)
    n.gpud.start()
    n.gpud.wait_ready()
    try:
        yield n
    finally:
        if n.gpud.running():
            n.gpud.terminate()
        print(n.gpud.log())


def telemetry_of(spec: str, state_dir: Path, index: int):
    """What the simulated GPU reads now, from the state gpud left (gpud must be stopped)."""
    backend = SimBackend(spec, state_dir)
    backend.open()
    try:
        return backend.read_telemetry(index)
    finally:
        backend.close()


def test_set_load_reaches_the_gpu_and_survives_a_restart(node: Node) -> None:
    uuid = node.uuids()[2]
    out = node.gpudctl("debug", "set-load", "--gpu", "2", "--util", "80", "--memory-mib", "30000")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"GPU 2 ({uuid}): utilization 80%, memory used 30000 MiB"

    node.gpud.terminate()
    node.gpud.start()
    node.gpud.wait_ready()
    # Only the utilization changes: the memory set before the restart is still in effect.
    out = node.gpudctl("debug", "set-load", "--gpu", "2", "--util", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("utilization 10%, memory used 30000 MiB")

    node.gpud.terminate()
    reading = telemetry_of("dgx-a100", node.gpud.state_dir, 2)
    assert reading.uuid == uuid
    assert reading.fb_used_mib == 30000
    assert 8 <= reading.gpu_util_pct <= 12  # type: ignore[operator]
    other = telemetry_of("dgx-a100", node.gpud.state_dir, 3)
    assert other.fb_used_mib != 30000  # GPU 3 still runs the moving load


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--gpu", "9", "--util", "5"), "no GPU with index 9"),
        (("--gpu", "0", "--util", "101"), "0 to 100"),
        (("--gpu", "0", "--util", "-3"), "0 to 100"),
        (("--gpu", "0", "--memory-mib", "40960"), "0-40381 MiB"),
        (("--gpu", "0", "--gi", "1", "--util", "5"), "no GPU instance 1"),
        (("--gpu", "0"), "nothing to set"),
        (("--gpu", "0", "--util", "lots"), "invalid float value"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(node: Node, args: tuple[str, ...], words) -> None:
    state = node.gpud.state_dir / "sim" / "dgx-a100.json"
    before = state.read_bytes()
    out = node.gpudctl("debug", "set-load", *args)
    assert out.returncode == 2, out
    assert words in out.stderr
    assert state.read_bytes() == before
    assert node.gpud.running()


def test_set_load_needs_root(node: Node) -> None:
    node.root.chmod(0o755)
    out = node.gpudctl("debug", "set-load", "--gpu", "0", "--util", "50", user=65534)
    assert out.returncode == 1
    assert "needs root" in out.stderr and "sudo" in out.stderr


def test_set_load_needs_the_simulated_backend(short_tmp: Path) -> None:
    n = make_node(short_tmp, extra=("--backend", "nvml"))
    n.gpud.start()
    try:
        n.gpud.wait_ready()
        out = n.gpudctl("debug", "set-load", "--gpu", "0", "--util", "50")
        assert out.returncode == 1
        assert "simulated backend" in out.stderr and "nvml" in out.stderr
    finally:
        assert n.gpud.terminate() == 0


@pytest.fixture
def nodes(short_tmp: Path) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def test_set_load_of_a_mig_instance(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    gi_ids = sorted({i["gi_id"] for i in node.state()["gpus"][0]["instances"]})
    assert len(gi_ids) == 7

    whole = node.gpudctl("debug", "set-load", "--gpu", "0", "--util", "50")
    assert whole.returncode == 2
    assert re.search(r"MIG mode.*--gi", whole.stderr), whole.stderr
    out = node.gpudctl(
        "debug", "set-load", "--gpu", "0", "--gi", str(gi_ids[3]), "--memory-mib", "4000"
    )
    assert out.returncode == 0, out.stderr
    assert f"GPU instance {gi_ids[3]}" in out.stdout
    too_big = node.gpudctl(
        "debug", "set-load", "--gpu", "0", "--gi", str(gi_ids[0]), "--memory-mib", "5000"
    )
    assert too_big.returncode == 2 and "0-4858 MiB" in too_big.stderr

    node.gpud.terminate()
    reading = telemetry_of("a100-40gb:1", node.gpud.state_dir, 0)
    loaded = reading.instance(gi_ids[3])
    assert loaded is not None and loaded.fb_used_mib == 4000
    document = json.loads((node.gpud.state_dir / "sim" / "a100-40gb_1.json").read_text())
    assert document["gpus"][0]["load"]["instances"] == [
        {"gi_id": gi_ids[3], "utilization_pct": None, "memory_used_mib": 4000}
    ]
