"""MIG on a running gpud, the way an operator and kubelet meet it.

gpud runs as a real process on the simulated backend (which enforces NVML's MIG rules and can
kill gpud with SIGKILL right after any mutation); kubelet and its PodResources API are fakes
speaking real gRPC on unix sockets (tests/support/mignode.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from gpud._proto.gpud.v1 import gpud_pb2
from gpud.hw.sim.backend import SimFaults, power_cycle_state, write_faults
from tests.support.kubelet import HEALTHY
from tests.support.mignode import MigNode, start, stopped_after
from tests.support.podresources import pod

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
DEFAULT_CONFIG = FIXTURES / "mig-parted-config-default.yaml"
GPU = "nvidia.com/gpu"
MIG_1G = "nvidia.com/mig-1g.5gb"


@pytest.fixture
def nodes(short_tmp: Path) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def layouts_file(root: Path) -> Path:
    """The real mig-parted default config when shared/ is beside the checkout, else gpud's own
    bundled layouts (which define the same all-1g.5gb and all-balanced)."""
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    from gpud.mig.layout import bundled_text

    path = root / "layouts.yaml"
    path.write_text(bundled_text())
    return path


BALANCED = [("1g.5gb", "2:1"), ("1g.5gb", "3:1"), ("2g.10gb", "0:2"), ("3g.20gb", "4:4")]


def test_fixture_layout_gives_kubelet_56_mig_devices_and_a_second_apply_changes_nothing(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "dgx-a100")
    nodes.append(node)
    node.kubelet.wait_devices(GPU, lambda d: len(d) == 8)
    config = layouts_file(short_tmp)

    code, out = node.mig("apply", "-f", str(config), "-c", "all-1g.5gb")
    assert code == 0, out
    assert out["result"] == "applied"
    # Per GPU: MIG on, the A100's reset, then 7 GPU instances with one compute instance each.
    assert out["mutations"] == len(out["plan"]) == 8 * (2 + 7 + 7)
    devices = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)
    assert all(d.health == HEALTHY for d in devices.values())
    assert all(i.startswith("MIG-") for i in devices)
    # Every GPU is partitioned now: the whole-GPU resource went away without a restart.
    node.kubelet.wait_disconnected(GPU)
    mig_uuid = sorted(devices)[0]
    resp = node.kubelet.allocate(MIG_1G, [mig_uuid])
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == mig_uuid

    code, again = node.mig("apply", "-f", str(config), "-c", "all-1g.5gb")
    assert code == 0
    assert (again["result"], again["mutations"], again["plan"]) == ("unchanged", 0, [])
    assert node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)


def test_layout_change_keeps_what_can_stay_and_reregisters_live(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0  # gpud's bundled layouts
    before = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
    stream_updates = node.kubelet.updates(MIG_1G)

    code, out = node.mig("apply", "-c", "all-balanced")
    assert code == 0 and out["result"] == "applied", out
    # mig-parted would destroy all 14 instances and build 4 per GPU: 2 * (7+7+4+4) = 44 calls.
    assert out["mutations"] < 44
    assert {s["action"] for s in out["plan"]} == {
        "destroy-ci",
        "destroy-gi",
        "create-gi",
        "create-ci",
    }
    assert node.instances() == {0: BALANCED, 1: BALANCED}
    after = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 4)
    assert set(after) < set(before)  # the 1g instances at 2:1 and 3:1 kept their UUIDs
    node.kubelet.wait_devices("nvidia.com/mig-2g.10gb", lambda d: len(d) == 2)
    node.kubelet.wait_devices("nvidia.com/mig-3g.20gb", lambda d: len(d) == 2)
    # The 1g plugin kept its stream: it was updated, not re-registered.
    assert node.kubelet.updates(MIG_1G) > stream_updates
    assert len([r for r in node.kubelet.registrations if r.resource == MIG_1G]) == 1


@pytest.mark.parametrize("start_from", [None, "all-1g.5gb"])
def test_kill_9_after_every_mutation_then_restart_converges(
    short_tmp: Path, nodes: list[MigNode], start_from: str | None
) -> None:
    spec = "a100-40gb:1"
    node = start(short_tmp, spec)
    nodes.append(node)
    if start_from:
        assert node.mig("apply", "-c", start_from)[0] == 0
    code, dry = node.mig("apply", "-c", "all-balanced", "--dry-run")
    assert code == 0 and dry["result"] == "planned"
    total = len(dry["plan"])
    assert total >= 8
    node.gpud.terminate()
    pristine = short_tmp / "pristine"
    shutil.copytree(short_tmp / "state", pristine)

    apply = gpud_pb2.ApplyMigLayoutRequest(config_name="all-balanced")
    for k in range(1, total + 1):
        shutil.rmtree(short_tmp / "state")
        shutil.copytree(pristine, short_tmp / "state")
        write_faults(short_tmp / "state", spec, SimFaults(crash_after=k))
        node.gpud.start()
        node.gpud.wait_ready()
        with pytest.raises(grpc.RpcError) as err:
            node.gpud.stub.ApplyMigLayout(apply, timeout=30)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, k
        assert node.gpud.kill() == -9  # it killed itself right after mutation k
        assert f"MIG step {k}/{total}" in node.gpud.log()

        updates = {r: node.kubelet.updates(r) for r in (MIG_1G, GPU)}
        node.gpud.start()
        node.gpud.wait_ready()
        state = node.gpud.stub.GetMigState(gpud_pb2.GetMigStateRequest(), timeout=10)
        held = sorted((i.profile, i.placement) for i in state.gpus[0].instances)
        assert held == BALANCED, f"after a crash at mutation {k}"
        assert state.selected_config == "all-balanced"
        assert state.last_apply.startswith("done")
        # The first list kubelet got from the restarted gpud was already the recovered layout,
        # and the layout before the apply (whole GPUs) was never offered again.
        node.kubelet.wait_updates(MIG_1G, updates[MIG_1G] + 1)
        assert len(node.kubelet.devices(MIG_1G)) == 2
        assert node.kubelet.updates(GPU) == updates[GPU]
        node.gpud.kill()


def test_instance_used_by_a_pod_is_not_destroyed_unless_forced(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    devices = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
    code, state = node.mig("show")
    doomed = next(i["mig_uuid"] for i in state["gpus"][1]["instances"] if i["placement"] == "5:1")
    kept = next(i["mig_uuid"] for i in state["gpus"][0]["instances"] if i["placement"] == "2:1")
    assert {doomed, kept} <= set(devices)
    assert node.podres is not None
    node.podres.pods = [
        pod("ml", "train-0", main={MIG_1G: [f"{doomed}::0"]}),
        pod("ml", "serve-1", web={MIG_1G: [kept]}),
    ]
    asked = len(node.podres.calls)
    out = node.gpudctl("mig", "apply", "-c", "all-balanced")
    assert out.returncode == 1
    assert f"ml/train-0/main uses {doomed} (GPU 1)" in out.stderr
    assert "serve-1" not in out.stderr  # its instance stays where it is
    assert "--force" in out.stderr
    assert node.instances()[1] == sorted([("1g.5gb", f"{i}:1") for i in range(7)])
    assert node.podres.calls[asked:] == ["List"]

    code, forced = node.mig("apply", "-c", "all-balanced", "--force")
    assert code == 0 and forced["result"] == "applied", forced
    skipped = "--force: pods (kubelet) and processes using the devices were not checked"
    assert skipped in forced["message"]
    assert node.instances() == {0: BALANCED, 1: BALANCED}


def test_a_process_on_an_instance_blocks_and_nvml_still_refuses_when_forced(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    code, state = node.mig("show")
    busy = next(i["mig_uuid"] for i in state["gpus"][0]["instances"] if i["placement"] == "0:1")
    assert (
        node.gpudctl(
            "debug", "inject-process", "--gpu", "0", "--pid", "4242", "--mig", busy
        ).returncode
        == 0
    )

    out = node.gpudctl("mig", "apply", "-c", "all-balanced")
    assert out.returncode == 1
    assert f"process 4242 uses {busy} (GPU 0)" in out.stderr

    code, forced = node.mig("apply", "-c", "all-balanced", "--force")
    assert code == 1 and forced["result"] == "failed" and forced["error_kind"] == "error"
    assert "IN_USE" in forced["message"]
    # It got as far as the busy instance; what is there is consistent and shown.
    assert busy in {i["mig_uuid"] for i in node.mig("show")[1]["gpus"][0]["instances"]}
    assert node.mig("show")[1]["last_apply"].startswith("failed")


def test_a_layout_that_does_not_fit_is_refused_before_any_mutation(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    bad = short_tmp / "bad.yaml"
    bad.write_text(
        "version: v1\nmig-configs:\n  too-much:\n    - devices: all\n      mig-enabled: true\n"
        "      mig-devices:\n        3g.20gb: 2\n        1g.5gb: 1\n"
    )
    code, out = node.mig("apply", "-f", str(bad), "-c", "too-much")
    assert code == 2
    assert (out["result"], out["mutations"], out["error_kind"]) == ("failed", 0, "invalid")
    assert "GPU 0" in out["message"] and "memory slices" in out["message"]
    assert node.mig("show")[1]["gpus"][0]["mode"] == "disabled"  # MIG was not even enabled

    code, out = node.mig("apply", "-f", str(bad), "-c", "nope")
    assert code == 2 and "too-much" in out["message"]


def test_the_selected_layout_is_recreated_after_a_reboot(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    node.gpud.terminate()
    power_cycle_state(short_tmp / "state", "a100-40gb:1")  # instances do not survive it
    node.gpud.start()
    node.gpud.wait_ready()
    assert len(node.instances()[0]) == 7
    devices = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 7)
    assert all(d.health == HEALTHY for d in devices.values())


def test_mig_apply_needs_root_but_a_dry_run_does_not(short_tmp: Path, nodes: list[MigNode]) -> None:
    node = start(short_tmp, "a100-40gb:1")
    nodes.append(node)
    short_tmp.chmod(0o755)
    out = node.gpudctl("mig", "apply", "-c", "all-1g.5gb", user=65534)
    assert out.returncode == 1 and "needs root" in out.stderr
    dry = node.gpudctl("mig", "apply", "-c", "all-1g.5gb", "--dry-run", user=65534)
    assert dry.returncode == 0 and "planned" in dry.stdout


def test_time_slicing_from_the_nvidia_device_plugin_config_unchanged(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    nvidia = FIXTURES / "nvidia-device-plugin-config.yaml"
    copy = short_tmp / "nvidia-plugin.yaml"
    if nvidia.exists():
        shutil.copy(nvidia, copy)
    else:  # the fixture's content, for a checkout without shared/ beside it
        copy.write_text(
            'version: v1\nflags:\n  migStrategy: "none"\n  failOnInitError: true\n'
            '  nvidiaDriverRoot: "/"\n  plugin:\n    passDeviceSpecs: false\n'
            '    deviceListStrategy: "envvar"\n    deviceIDStrategy: "uuid"\nsharing:\n'
            "  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
        )
    node = start(short_tmp, "dgx-a100", f"version: v1\ndevicePlugin:\n  configFile: {copy}\n")
    nodes.append(node)
    devices = node.kubelet.wait_devices(GPU, lambda d: len(d) == 32)
    uuids = node.uuids()
    assert set(devices) == {f"{u}::{n}" for u in uuids for n in range(4)}
    resp = node.kubelet.allocate(GPU, [f"{uuids[3]}::0", f"{uuids[3]}::2"])
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == uuids[3]


def test_rename_by_default_advertises_gpu_shared(short_tmp: Path, nodes: list[MigNode]) -> None:
    sharing = yaml.safe_dump(
        {
            "sharing": {
                "timeSlicing": {
                    "renameByDefault": True,
                    "failRequestsGreaterThanOne": True,
                    "resources": [{"name": "nvidia.com/gpu", "replicas": 4}],
                }
            }
        }
    )
    node = start(short_tmp, "dgx-a100", "version: v1\n" + sharing)
    nodes.append(node)
    devices = node.kubelet.wait_devices("nvidia.com/gpu.shared", lambda d: len(d) == 32)
    reg = node.kubelet.wait_registered("nvidia.com/gpu.shared")
    assert reg.endpoint == "nvidia-gpu.shared.sock"
    two = sorted(devices)[:2]
    with pytest.raises(grpc.RpcError) as err:
        node.kubelet.allocate("nvidia.com/gpu.shared", two)
    assert "maximum request size for shared resources is 1" in err.value.details()


def test_devices_are_withdrawn_from_kubelet_before_the_first_mutation(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
    seen: list[dict[str, str]] = []

    def record(resource: str, at: float) -> None:
        if resource == MIG_1G:
            seen.append({i: d.health for i, d in node.kubelet.devices(resource).items()})

    node.kubelet.on_update = record
    assert node.mig("apply", "-c", "all-balanced")[0] == 0
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 4)
    # First message: the old layout, whole, every device Unhealthy (nothing destroyed yet);
    # last: the new layout, healthy.
    assert len(seen[0]) == 14 and set(seen[0].values()) == {"Unhealthy"}
    assert len(seen[-1]) == 4 and set(seen[-1].values()) == {HEALTHY}


def test_single_strategy_refuses_mixed_profiles_and_never_leaves_kubelet_stale_devices(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:1", "version: v1\ndevicePlugin:\n  migStrategy: single\n")
    nodes.append(node)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    seven = node.kubelet.wait_devices(GPU, lambda d: len(d) == 7)  # MIG devices as nvidia.com/gpu
    held = node.instances()

    # The dry run says what the apply would do: refuse, before any mutation.
    code, dry = node.mig("apply", "-c", "all-balanced", "--dry-run")
    assert (code, dry["result"], dry["error_kind"]) == (1, "failed", "refused"), dry
    assert "single needs one MIG profile" in dry["message"]
    assert dry["plan"], "the plan is shown with the refusal"
    code, out = node.mig("apply", "-c", "all-balanced")
    assert (code, out["mutations"], out["error_kind"]) == (1, 0, "refused"), out
    assert "--force" in out["message"]
    assert node.instances() == held
    assert set(node.kubelet.devices(GPU)) == set(seven) and node.kubelet.allocatable(GPU) == 7

    # Forced: applied, and kubelet keeps no ID of an instance that was destroyed.
    code, forced = node.mig("apply", "-c", "all-balanced", "--force")
    assert code == 0 and forced["result"] == "applied", forced
    assert "--force: migStrategy single cannot advertise the result" in forced["message"]
    live = {i["mig_uuid"] for g in node.state()["gpus"] for i in g["instances"]}
    kept = node.kubelet.wait_devices(GPU, lambda d: set(d) <= live)
    assert len(kept) == 2 and set(kept) < set(seven)  # the two 1g.5gb that stayed where they were
    status = node.gpud.status()
    assert "single needs one MIG profile" in status.resource_error
    assert "use migStrategy mixed" in status.resource_error
    assert "cannot advertise as configured" in node.gpudctl("status").stdout


def test_a_client_that_goes_away_mid_apply_never_leaves_it_half_done(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    """Ctrl-C (here kill -9) on ``gpudctl mig apply`` ends the client's call; the apply it asked
    for runs to its end all the same, and kubelet gets the new devices back."""
    node = start(short_tmp, "dgx-a100")
    nodes.append(node)
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpud.cli.gpudctl",
            "--socket",
            str(node.gpud.socket),
            "mig",
            "apply",
            "-c",
            "all-1g.5gb",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node.gpud.wait_log("MIG step 20/128")
    finally:
        client.kill()
        client.wait()
    node.gpud.wait_log("MIG layout 'all-1g.5gb' applied with 128 NVML calls")
    node.kubelet.wait_devices("nvidia.com/mig-1g.5gb", lambda d: len(d) == 56)
    assert node.state()["last_apply"] == "done (all-1g.5gb)"
