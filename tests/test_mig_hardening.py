"""MIG in the field: what a user can send, and what a running gpud must do with it.

Each test drives a real gpud process on a simulated machine through gpudctl or its gRPC API, with
kubelet's device manager and PodResources API as stand-ins over real unix sockets (see
tests/support/mignode.py). They come from a review that drove gpud as a new user would: an empty
layout file, an alias bomb in a dry run, health lost on an apply, GPUs without MIG, the single
strategy, a kubelet that cannot be asked.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc
from gpud.daemon.mig import PODRESOURCES_TIMEOUT_S
from gpud.hw.sim.backend import power_cycle_state
from gpud.mig.layout import MAX_LAYOUT_BYTES
from tests.support.kubelet import HEALTHY, UNHEALTHY
from tests.support.mignode import MigNode, start, stopped_after

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"
MIG_1G = "nvidia.com/mig-1g.5gb"
MIG_3G = "nvidia.com/mig-3g.20gb"


@pytest.fixture
def nodes(short_tmp: Path) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def layout(name: str, body: str) -> str:
    return f"version: v1\nmig-configs:\n  {name}:\n{body}"


def untouched(node: MigNode) -> None:
    """Every GPU as a fresh simulated machine has it, and nothing selected for the next start."""
    state = node.state()
    assert {g["mode"] for g in state["gpus"]} == {"disabled"}, state
    assert all(not g["instances"] for g in state["gpus"])
    assert state["selected_config"] == ""


# ---- 1: an empty file ---------------------------------------------------------------------------


def test_a_file_without_layouts_is_exit_2_and_nothing_changes(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    empty = short_tmp / "e.yaml"
    for text in ("", "# nothing yet\n", "version: v1\nmig-configs: {}\n"):
        empty.write_text(text)
        for verb in ("apply", "validate"):
            out = node.gpudctl("mig", verb, "-f", str(empty), "-c", "all-1g.5gb")
            assert out.returncode == 2, (text, verb, out)
            assert "defines no layouts" in out.stderr
        assert node.gpudctl("mig", "assert", "-f", str(empty), "-c", "all-1g.5gb").returncode == 2
    untouched(node)
    # Nothing was recorded for the next start either.
    node.gpud.terminate()
    node.gpud.start()
    node.gpud.wait_ready()
    untouched(node)


# ---- 2, 3, 9: bounded input, parsed before the lock --------------------------------------------

ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
    "version: v1\n"
    "mig-configs:\n  bomb: [*f, *f, *f, *f]\n"
)

ENTRY = "    - devices: all\n      mig-enabled: true\n      mig-devices:\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param(ALIAS_BOMB, "more than 20000 YAML nodes", id="alias-bomb"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested deeper than 16", id="deep"),
        pytest.param(
            layout("big", ENTRY + "        1g.5gb: 100000000\n"),
            "mig-configs.big[0].mig-devices.1g.5gb: count 100000000 is more than a GPU holds",
            id="count-1e8",
        ),
        pytest.param(
            layout("big", ENTRY + "        1g.5gb: 1000000000000000000000\n"),
            "mig-configs.big[0].mig-devices.1g.5gb: count 1000000000000000000000 is more",
            id="count-1e21",
        ),
        pytest.param(
            layout("big", ENTRY + "        1c.3g.20gb: 1000\n"),
            "mig-configs.big[0].mig-devices.1c.3g.20gb: count 1000 is more than a GPU holds",
            id="ci-count-1000",
        ),
        pytest.param(
            layout("big", ENTRY + "        1g.5gb: 0x" + "F" * 50_000 + "\n"),
            "count <a 200000-bit number> is more than a GPU holds",
            id="hex-count",
        ),
        pytest.param(
            layout("big", ENTRY + "        1g.5gb: " + "9" * 5000 + "\n"),
            "line 7: cannot be read",
            id="digits",
        ),
    ],
)
def test_a_dry_run_of_hostile_input_is_a_short_exit_2_and_the_daemon_stays_small(
    short_tmp: Path, nodes: list[MigNode], text: str, says: str
) -> None:
    node = start(short_tmp, "dgx-a100")
    nodes.append(node)
    assert node.gpud.pid is not None
    before = rss_kib(node.gpud.pid)
    path = short_tmp / "hostile.yaml"
    path.write_text(text)
    name = "bomb" if text is ALIAS_BOMB else "big"
    out = node.gpudctl("mig", "apply", "-f", str(path), "-c", name, "--dry-run")
    assert out.returncode == 2, out
    assert says in out.stderr
    assert len(out.stdout) + len(out.stderr) < 4000, "refusals echo the input cut short"
    assert node.gpud.running()
    # Nothing built from the input stays: 20 MiB covers the allocator's own growth.
    assert rss_kib(node.gpud.pid) - before < 20 * 1024
    # It was refused before the MIG lock was taken (parse and check first).
    assert node.state()["lock_longest_held_by"] == "a MIG state read"


def test_a_large_file_is_refused_by_gpud_not_by_grpc(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    big = short_tmp / "big.yaml"
    for size in (3 * 1024 * 1024, 10 * 1024 * 1024):
        big.write_text("#" * size)
        for args in (("apply", "--dry-run"), ("apply",), ("assert",), ("validate",)):
            out = node.gpudctl("mig", *args, "-f", str(big), "-c", "x")
            assert out.returncode == 2, (args, out)
            assert f"{size} bytes is more than the 256 KiB a layout file may have" in out.stderr
            assert "Received message larger than max" not in out.stderr
    # A client other than gpudctl gets the same answer from the daemon itself.
    reply = node.gpud.stub.ApplyMigLayout(
        gpud_pb2.ApplyMigLayoutRequest(
            config_name="x", config_yaml="#" * (MAX_LAYOUT_BYTES + 1), dry_run=True
        ),
        timeout=30,
    )
    assert (reply.result, reply.error_kind) == ("failed", "invalid")
    assert "is more than the 256 KiB" in reply.message
    untouched(node)


def test_refusals_echo_what_was_sent_cut_short(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    long_name = "n" * 100_000
    out = node.gpudctl("mig", "apply", "-c", long_name, "--dry-run")
    assert out.returncode == 2 and "no layout named 'nnnn" in out.stderr
    assert len(out.stderr) < 2000
    many = short_tmp / "many.yaml"
    many.write_text(layout("x", "".join(f"    - devices: [{i}]\n" for i in range(500))))
    out = node.gpudctl("mig", "apply", "-f", str(many), "-c", "x", "--dry-run")
    assert out.returncode == 2 and "... and 480 more problems" in out.stderr
    assert len(out.stderr) < 4000


# ---- 4, 7, 9: instance-scoped health ------------------------------------------------------------


def devices_of(node: MigNode, resource: str, gpu: str) -> dict[str, str]:
    """Health of the MIG devices of one GPU as kubelet has them, by MIG UUID."""
    state = node.state()
    mine = {i["mig_uuid"] for g in state["gpus"] if g["uuid"] == gpu for i in g["instances"]}
    return {i: d.health for i, d in node.kubelet.devices(resource).items() if i in mine}


def test_an_instance_xid_survives_an_apply_elsewhere_and_set_healthy_says_what_happened(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "dgx-a100")
    nodes.append(node)
    code, out = node.mig("apply", "-c", "all-balanced")
    assert code == 0, out
    node.kubelet.wait_devices(MIG_3G, lambda d: len(d) == 8)
    gpus = node.state()["gpus"]
    gpu1 = gpus[1]
    three_g = next(i for i in gpu1["instances"] if i["profile"] == "3g.20gb")
    out = node.gpudctl(
        "debug", "inject-xid", "--gpu", "1", "--xid", "79", "--gi", str(three_g["gi_id"])
    )
    assert out.returncode == 0, out
    assert f"GPU instance {three_g['gi_id']}" in out.stdout
    bad = three_g["mig_uuid"]
    node.kubelet.wait_devices(MIG_3G, lambda d: d[bad].health == UNHEALTHY)
    assert [i for i, d in node.kubelet.devices(MIG_3G).items() if d.health != HEALTHY] == [bad]

    # A layout that touches only GPU 7.
    only7 = short_tmp / "only7.yaml"
    only7.write_text(
        layout(
            "gpu7",
            "    - devices: [7]\n      mig-enabled: true\n      mig-devices:\n        1g.5gb: 7\n",
        )
    )
    code, out = node.mig("apply", "-f", str(only7), "-c", "gpu7")
    assert code == 0 and {s["gpu"] for s in out["plan"]} == {7}, out
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 7 * 2 + 7)
    assert node.kubelet.devices(MIG_3G)[bad].health == UNHEALTHY, "its reason survived the apply"
    assert [i for i, d in node.kubelet.devices(MIG_3G).items() if d.health != HEALTHY] == [bad]

    # set-healthy on that MIG device returns it, and says so.
    out = node.gpudctl("device", "set-healthy", bad)
    assert out.returncode == 0 and f"{bad} (GPU 1) is back in service" in out.stdout, out
    node.kubelet.wait_devices(MIG_3G, lambda d: d[bad].health == HEALTHY)

    # An XID on the whole of GPU 2: set-healthy on one of its MIG devices cannot return it.
    gpu2 = gpus[2]
    assert node.gpudctl("debug", "inject-xid", "--gpu", "2", "--xid", "79").returncode == 0
    small = [i["mig_uuid"] for i in gpu2["instances"] if i["profile"] == "1g.5gb"]
    node.kubelet.wait_devices(MIG_1G, lambda d: all(d[u].health == UNHEALTHY for u in small))
    one = small[0]
    out = node.gpudctl("device", "set-healthy", one)
    assert out.returncode == 1, out
    assert "is back in service" not in out.stdout
    assert f"GPU 2 ({gpu2['uuid']}), which is itself out of service (critical XID 79)" in out.stderr
    assert f"sudo gpudctl device set-healthy {gpu2['uuid']}" in out.stderr
    assert set(devices_of(node, MIG_1G, gpu2["uuid"]).values()) == {UNHEALTHY}
    out = node.gpudctl("device", "set-healthy", gpu2["uuid"])
    assert out.returncode == 0 and f"GPU 2 ({gpu2['uuid']}) is back in service" in out.stdout
    node.kubelet.wait_devices(MIG_1G, lambda d: all(v.health == HEALTHY for v in d.values()))
    out = node.gpudctl("device", "set-healthy", gpu2["uuid"])
    assert out.returncode == 0 and "was not out of service; nothing changed" in out.stdout


def test_an_xid_scoped_to_an_unknown_instance_takes_the_gpu_and_says_why(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
    gpu1 = node.state()["gpus"][1]
    out = node.gpudctl("debug", "inject-xid", "--gpu", "1", "--xid", "79", "--gi", "99")
    assert out.returncode == 0, out
    mine = {i["mig_uuid"] for i in gpu1["instances"]}
    node.kubelet.wait_devices(
        MIG_1G, lambda d: {i for i, v in d.items() if v.health == UNHEALTHY} == mine
    )
    assert "XID 79 is scoped to GPU instance 99, which GPU 1 does not hold" in node.gpud.log()
    out = node.gpudctl("debug", "inject-xid", "--gpu", "1", "--xid", "79", "--ci", "0")
    assert out.returncode == 2 and "--ci needs --gi" in out.stderr


# ---- 5: GPUs without MIG ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["l4x2", "t4x1"])
def test_gpus_without_mig(short_tmp: Path, nodes: list[MigNode], spec: str) -> None:
    node = start(short_tmp, spec, "version: v1\nmig:\n  layout: all-disabled\n")
    nodes.append(node)
    # The GPU Operator's default label value, at start: nothing to do, nothing refused.
    log = node.gpud.wait_log("layout 'all-disabled' at start: unchanged")
    assert "MIG layout not restored" not in log and "refused" not in log
    code, out = node.mig("apply", "-c", "all-disabled")
    assert (code, out["result"], out["mutations"]) == (0, "unchanged", 0), out
    assert node.gpudctl("mig", "assert", "-c", "all-disabled").returncode == 0

    code, out = node.mig("apply", "-c", "all-enabled")
    assert (code, out["error_kind"]) == (2, "invalid"), out
    assert "GPU 0" in out["message"] and "MIG is not supported on this GPU" in out["message"]
    named = short_tmp / "named.yaml"
    named.write_text(
        layout("gpu0", "    - devices: [0]\n      mig-enabled: true\n      mig-devices: {}\n")
    )
    code, out = node.mig("apply", "-f", str(named), "-c", "gpu0", "--dry-run")
    assert code == 2 and "MIG is not supported on this GPU" in out["message"], out
    code, out = node.mig("apply", "-c", "all-1g.5gb")  # bundled: filtered to MIG boards
    assert code == 2 and "matches no GPU on this node" in out["message"]
    node.kubelet.wait_devices(GPU, lambda d: len(d) == len(node.uuids()))


# ---- 8: failing closed without PodResources -----------------------------------------------------


def test_kubelet_installed_but_podresources_missing_refuses_unless_forced(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1", podres=False)
    nodes.append(node)
    code, out = node.mig("apply", "-c", "all-1g.5gb")
    assert (code, out["result"], out["error_kind"], out["mutations"]) == (1, "failed", "refused", 0)
    message = out["message"]
    assert f"kubelet is installed ({short_tmp / 'kubelet'} exists)" in message
    assert f"{node.podres_socket} does not exist" in message
    assert "Start kubelet" in message and "--force" in message
    untouched(node)

    code, out = node.mig("apply", "-c", "all-1g.5gb", "--force")
    assert code == 0 and out["result"] == "applied", out
    assert (
        "--force: pods (kubelet) and processes using the devices were not checked"
        in (out["message"])
    )
    # After a reboot the layout is recreated before kubelet runs: creating takes nothing away.
    node.gpud.terminate()
    power_cycle_state(short_tmp / "state", "a100-40gb:1")
    node.gpud.start()
    node.gpud.wait_ready()
    assert len(node.instances()[0]) == 7


def test_podresources_that_do_not_answer_refuse_within_the_timeout(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    assert node.podres is not None
    node.podres.delay = PODRESOURCES_TIMEOUT_S + 3  # kubelet hung
    out = node.gpudctl("mig", "apply", "-c", "all-1g.5gb")
    assert out.returncode == 1 and "DEADLINE_EXCEEDED" in out.stderr, out
    assert node.podres.calls == ["List"]
    untouched(node)
    # A socket left behind by a kubelet that died: nobody accepts on it.
    node.podres.stop()
    node.podres_socket.unlink(missing_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(node.podres_socket))
    try:
        out = node.gpudctl("mig", "apply", "-c", "all-1g.5gb")
        assert out.returncode == 1 and "UNAVAILABLE" in out.stderr, out
        assert "kubelet is installed" in out.stderr
    finally:
        stale.close()
    untouched(node)


def test_without_kubelet_nvml_processes_alone_decide(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:1", kubelet=False)
    nodes.append(node)
    uuid = node.uuids()[0]
    assert node.gpudctl("debug", "inject-process", "--gpu", "0", "--pid", "4242").returncode == 0
    out = node.gpudctl("mig", "apply", "-c", "all-1g.5gb")
    assert out.returncode == 1 and f"process 4242 uses {uuid} (GPU 0)" in out.stderr, out
    assert "kubelet" not in out.stderr
    node.gpudctl("debug", "inject-process", "--gpu", "0", "--pid", "4242", "--remove")
    code, out = node.mig("apply", "-c", "all-1g.5gb")
    assert code == 0 and out["result"] == "applied", out
    assert "no kubelet on this node" in node.gpud.log()


# ---- 9: SIGTERM with a client connected ---------------------------------------------------------


def test_sigterm_with_a_client_connected_stops_cleanly(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    with grpc.insecure_channel(f"unix:{node.gpud.socket}") as channel:
        gpud_pb2_grpc.GpudStub(channel).GetStatus(gpud_pb2.GetStatusRequest(), timeout=10)
        assert node.gpud.terminate() == 0
    log = node.gpud.log()
    assert "Traceback" not in log and "CancelledError" not in log, log


# ---- 10: mig assert -----------------------------------------------------------------------------


def test_mig_assert_compares_without_the_lock(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    out = node.gpudctl("mig", "assert", "-c", "all-1g.5gb")
    assert out.returncode == 1, out
    assert out.stdout.splitlines() == [
        "layout 'all-1g.5gb' is not applied",
        "  GPU 0: holds MIG disabled; the layout wants MIG enabled, 1g.5gb \u00d77",
        "  GPU 1: holds MIG disabled; the layout wants MIG enabled, 1g.5gb \u00d77",
    ]
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    out = node.gpudctl("mig", "assert", "-c", "all-1g.5gb", "-o", "json")
    assert out.returncode == 0 and '"applied": true' in out.stdout, out

    one = short_tmp / "one.yaml"
    one.write_text(
        layout(
            "mixed",
            "    - devices: [0]\n      mig-enabled: true\n      mig-devices: {1g.5gb: 7}\n"
            "    - devices: [1]\n      mig-enabled: true\n      mig-devices: {3g.20gb: 2}\n",
        )
    )
    out = node.gpudctl("mig", "assert", "-f", str(one), "-c", "mixed")
    assert out.returncode == 1
    assert out.stdout.splitlines()[1:] == [
        "  GPU 1: holds MIG enabled, 1g.5gb \u00d77; the layout wants MIG enabled, 3g.20gb \u00d72"
    ]
    for bad in (("-c", "nope"), ("-f", str(one), "-c", "all-1g.5gb")):
        out = node.gpudctl("mig", "assert", *bad)
        assert out.returncode == 2 and "no layout named" in out.stderr, out
    too_much = short_tmp / "too-much.yaml"
    too_much.write_text(layout("x", ENTRY + "        3g.20gb: 3\n"))
    out = node.gpudctl("mig", "assert", "-f", str(too_much), "-c", "x")
    assert out.returncode == 2 and "does not fit" in out.stderr

    # An apply that holds the MIG lock (kubelet is slow to answer) does not hold up an assert.
    assert node.podres is not None
    node.podres.delay = 4.0
    applying = node.gpud.stub.ApplyMigLayout.future(
        gpud_pb2.ApplyMigLayoutRequest(config_name="all-balanced"), timeout=60
    )
    asked = len(node.podres.calls)
    deadline = time.monotonic() + 30
    while len(node.podres.calls) == asked:  # the apply now waits for kubelet, holding the lock
        assert time.monotonic() < deadline and not applying.done(), "the apply never asked"
        time.sleep(0.01)
    out = node.gpudctl("mig", "assert", "-c", "all-1g.5gb")
    assert not applying.done(), "the assert waited for the apply"
    assert out.returncode == 0, out
    assert applying.result().result == "applied"
    assert node.state()["lock_longest_held_by"] == "the apply of 'all-balanced'"
