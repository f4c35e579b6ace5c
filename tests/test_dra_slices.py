"""gpud's ResourceSlices through a real API server, allocated by the real scheduler.

kubekit with ``KUBEKIT_WITH=scheduler,claims``: kube-apiserver (Node authorizer,
NodeRestriction), kube-scheduler and the ResourceClaim controller. gpud is a real process on a
simulated machine in ``allocation.mode: dra`` with the node's kubelet identity. The DeviceClasses
are what ``gpudctl dra manifests`` prints, applied with ``kubectl apply -f -``. No kubelet runs:
pods are only scheduled and their claims allocated, with real CEL over gpud's devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpud.dra.devices import dra_devices
from gpud.dra.slices import plan, slice_specs
from gpud.hw.sim.backend import SimBackend
from gpud.hw.sim.machines import MACHINES, MODELS
from tests.support.drakubelet import Claim, FakeDraKubelet
from tests.support.kubekit import Cluster, running
from tests.support.mignode import MigNode, start, stopped_after
from tests.support.snapshot import snapshot

DRIVER = "gpu.nvidia.com"
_names = count()


@pytest.fixture(scope="module")
def kube() -> Iterator[Cluster]:
    with running("gpud-kube-dra-", with_parts="scheduler,claims") as found:
        manifests = subprocess.run(
            [sys.executable, "-m", "gpud.cli.gpudctl", "dra", "manifests"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        applied = found.kubectl("apply", "-f", "-", stdin=manifests)
        assert "deviceclass.resource.k8s.io/gpu.nvidia.com created" in applied
        assert "deviceclass.resource.k8s.io/mig.nvidia.com created" in applied
        yield found


@pytest.fixture
def nodes(kube: Cluster) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started
    # Each test starts from a node with no slices (as kubelet leaves it at its start).
    kube.kubectl("delete", "resourceslices", "--field-selector", f"spec.nodeName={kube.node}")


def config(kube: Cluster, extra: str = "") -> str:
    return (
        f"version: v1\nallocation:\n  mode: dra\n"
        f"kubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n{extra}"
    )


def slices(kube: Cluster) -> list[dict[str, Any]]:
    out = kube.kubectl(
        "get", "resourceslices", "-o", "json", "--field-selector", f"spec.nodeName={kube.node}"
    )
    return list(json.loads(out)["items"])


def devices(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in found for d in s["spec"].get("devices", ())}


def wait_slices(
    kube: Cluster,
    check: Callable[[list[dict[str, Any]]], bool],
    what: str,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = slices(kube)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s: {sorted(devices(found))}")
        time.sleep(0.2)


def link(node: MigNode) -> str:
    out = node.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    found = next(p for p in json.loads(out.stdout)["publishers"] if p["name"] == "kubernetes")
    return str(found["detail"])


def started(kube: Cluster, root: Path, spec: str = "dgx-a100", extra: str = "") -> MigNode:
    node = start(root, spec, config(kube, extra))
    wait_slices(kube, lambda s: len(devices(s)) > 0, "slices")
    return node


def namespace(kube: Cluster) -> str:
    name = f"dra-{next(_names)}-{int(time.time()) % 100000}"
    kube.kubectl("create", "namespace", name)
    return name


def apply(kube: Cluster, docs: list[dict[str, Any]]) -> None:
    """Create objects, retrying while the namespace's default ServiceAccount is not made yet."""
    text = "\n---\n".join(json.dumps(d) for d in docs)
    deadline = time.monotonic() + 20
    while True:
        try:
            kube.kubectl("create", "-f", "-", stdin=text)
            return
        except AssertionError as exc:
            if "serviceaccount" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def claim_pod(
    kube: Cluster, ns: str, device_class: str = DRIVER, selectors: tuple[str, ...] = ()
) -> str:
    """A pod with its own claim (from a template) for one device of ``device_class``."""
    exactly: dict[str, Any] = {"deviceClassName": device_class}
    if selectors:
        exactly["selectors"] = [{"cel": {"expression": s}} for s in selectors]
    template = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "one", "namespace": ns},
        "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "worker", "namespace": ns},
        "spec": {
            "containers": [
                {"name": "c", "image": "pause", "resources": {"claims": [{"name": "gpu"}]}}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "one"}],
        },
    }
    apply(kube, [template, pod])
    return "worker"


def pod(kube: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kube.kubectl("get", "pod", "-n", ns, name, "-o", "json")))


def wait_pod(
    kube: Cluster, ns: str, name: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 40
    while True:
        found = pod(kube, ns, name)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {ns}/{name} never {what}: {found.get('status')}")
        time.sleep(0.2)


def scheduled(kube: Cluster, ns: str, name: str) -> dict[str, Any]:
    """The pod once bound, and its claim's one allocated device."""
    found = wait_pod(kube, ns, name, lambda p: bool(p["spec"].get("nodeName")), "scheduled")
    assert found["spec"]["nodeName"] == kube.node
    status = found["status"]
    claim_name = (
        status["resourceClaimStatuses"][0]["resourceClaimName"]
        if status.get("resourceClaimStatuses")
        else status["extendedResourceClaimStatus"]["resourceClaimName"]
    )
    claim = json.loads(kube.kubectl("get", "resourceclaim", "-n", ns, claim_name, "-o", "json"))
    results = claim["status"]["allocation"]["devices"]["results"]
    assert len(results) == 1, results
    return dict(results[0])


def unschedulable(kube: Cluster, ns: str, name: str) -> str:
    def refused(p: dict[str, Any]) -> bool:
        return any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in p["status"].get("conditions", ())
        )

    found = wait_pod(kube, ns, name, refused, "found unschedulable")
    assert not found["spec"].get("nodeName")
    return next(c["message"] for c in found["status"]["conditions"] if c["type"] == "PodScheduled")


def test_slices_of_the_dgx_a100_and_a_claim_allocated_to_one_of_its_gpus(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started(kube, short_tmp)
    nodes.append(node)
    found = slices(kube)
    assert len(found) == 1
    spec = found[0]["spec"]
    assert spec["driver"] == DRIVER and spec["nodeName"] == kube.node
    assert spec["pool"] == {"name": kube.node, "generation": 1, "resourceSliceCount": 1}
    by_name = devices(found)
    assert sorted(by_name) == [f"gpu-{i}" for i in range(8)]
    gpu0 = by_name["gpu-0"]
    assert gpu0["attributes"]["type"] == {"string": "gpu"}
    assert gpu0["attributes"]["productName"] == {"string": "NVIDIA A100-SXM4-40GB"}
    assert gpu0["attributes"]["driverVersion"] == {"version": "550.127.5"}
    assert gpu0["attributes"]["cudaDriverVersion"] == {"version": "12.4.0"}
    assert gpu0["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": "0000:07:00.0"}
    assert gpu0["capacity"]["memory"] == {"value": "40Gi"}
    detail = link(node)
    assert "DRA: 8 devices in 1 ResourceSlice (gpu.nvidia.com, pool generation 1)" in detail

    ns = namespace(kube)
    result = scheduled(kube, ns, claim_pod(kube, ns))
    assert result["driver"] == DRIVER and result["pool"] == kube.node
    assert result["device"] in by_name

    # Nothing is sent while nothing changes, a restart of gpud included.
    version = found[0]["metadata"]["resourceVersion"]
    node.gpud.terminate()
    node.gpud.start()
    node.gpud.wait_ready()
    deadline = time.monotonic() + 20
    while "DRA: 8 devices" not in link(node):
        assert time.monotonic() < deadline, link(node)
        time.sleep(0.2)
    again = slices(kube)
    assert [s["metadata"]["resourceVersion"] for s in again] == [version]


def test_selectors_on_product_name_and_memory_pick_only_matching_devices(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    nodes.append(started(kube, short_tmp))
    attr = f"device.attributes['{DRIVER}']"
    memory = f"device.capacity['{DRIVER}'].memory"
    cases = [
        (f"{attr}.productName == 'NVIDIA A100-SXM4-40GB'", True),
        (f"{attr}.productName == 'NVIDIA H100 80GB HBM3'", False),
        (f"{memory}.compareTo(quantity('40Gi')) >= 0", True),
        (f"{memory}.compareTo(quantity('80Gi')) >= 0", False),
        (f"{attr}.cudaComputeCapability.isGreaterThan(semver('7.5.0'))", True),
        (f"{attr}.driverVersion.isGreaterThan(semver('560.0.0'))", False),
    ]
    for expression, matches in cases:
        ns = namespace(kube)
        name = claim_pod(kube, ns, selectors=(expression,))
        if matches:
            assert scheduled(kube, ns, name)["device"].startswith("gpu-"), expression
        else:
            message = unschedulable(kube, ns, name)
            assert "cannot allocate all claims" in message, (expression, message)


def test_a_pod_asking_nvidia_com_gpu_is_served_through_the_extended_resource_class(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    nodes.append(started(kube, short_tmp))
    ns = namespace(kube)
    plain = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "classic", "namespace": ns},
        "spec": {
            "containers": [
                {"name": "c", "image": "pause", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ]
        },
    }
    apply(kube, [plain])
    result = scheduled(kube, ns, "classic")
    assert result["driver"] == DRIVER and result["device"].startswith("gpu-")


def test_a_mig_apply_is_published_at_once_with_a_new_generation(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started(kube, short_tmp)
    nodes.append(node)
    pid = node.gpud.pid
    before = slices(kube)[0]["spec"]["pool"]["generation"]
    code, answer = node.mig("apply", "-c", "all-1g.5gb")
    assert code == 0, answer
    found = wait_slices(kube, lambda s: len(devices(s)) == 56, "56 MIG devices")
    names = devices(found)
    assert sorted(names) == sorted(
        f"gpu-{g}-mig-1g5gb-19-{start}" for g in range(8) for start in range(7)
    )
    assert all(d["attributes"]["type"] == {"string": "mig"} for d in names.values())
    assert {s["spec"]["pool"]["generation"] for s in found} == {
        found[0]["spec"]["pool"]["generation"]
    }
    assert found[0]["spec"]["pool"]["generation"] > before
    assert node.gpud.pid == pid  # no restart
    ns = namespace(kube)
    result = scheduled(kube, ns, claim_pod(kube, ns, device_class="mig.nvidia.com"))
    assert result["device"] in names
    assert "DRA: 56 devices in 1 ResourceSlice" in link(node)


def test_a_mig_device_the_scheduler_picked_from_gpuds_slices_is_prepared_end_to_end(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """The whole path on one node: gpud's own slices after a MIG apply, the real scheduler's
    allocation of one MIG device, and kubelet's Prepare of that claim naming the same device
    (one naming for slices and Prepare) with a CDI spec for its GPU."""
    cdi = short_tmp / "cdi"
    with FakeDraKubelet(short_tmp) as kubelet:
        node = started(kube, short_tmp, extra=f"dra:\n  cdiDir: {cdi}\n")
        nodes.append(node)
        kubelet.wait_registered(DRIVER)
        assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
        wait_slices(kube, lambda s: len(devices(s)) == 56, "56 MIG devices")
        ns = namespace(kube)
        result = scheduled(kube, ns, claim_pod(kube, ns, device_class="mig.nvidia.com"))
        device = result["device"]
        minor = int(device.split("-")[1])
        found = json.loads(kube.kubectl("get", "resourceclaims", "-n", ns, "-o", "json"))
        meta = found["items"][0]["metadata"]
        claim = Claim(ns, meta["name"], meta["uid"])
        answer = kubelet.prepare(DRIVER, claim)[claim.uid]
        assert answer["error"] == "", answer
        (prepared,) = answer["devices"]
        assert prepared["device"] == device
        spec = yaml.safe_load((cdi / f"k8s.gpu.nvidia.com-claim_{claim.uid}.yaml").read_text())
        (entry,) = spec["devices"]
        assert entry["containerEdits"]["deviceNodes"] == [{"path": f"/dev/nvidia{minor}"}]
        assert kubelet.unprepare(DRIVER, claim) == {claim.uid: ""}
        assert list(cdi.iterdir()) == []


def test_wiped_slices_come_back_an_xid_taints_and_the_api_server_restart_is_survived(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started(kube, short_tmp)
    nodes.append(node)
    # kubelet deletes every slice of the node when it starts: gpud puts them back.
    kube.kubectl("delete", "resourceslices", "--field-selector", f"spec.nodeName={kube.node}")
    wait_slices(kube, lambda s: len(devices(s)) == 8, "slices put back", timeout=15)

    kube.down()
    try:
        assert node.gpudctl("debug", "inject-xid", "--gpu", "3", "--xid", "79").returncode == 0
        time.sleep(1.0)
    finally:
        kube.up()
    found = wait_slices(
        kube, lambda s: bool(devices(s).get("gpu-3", {}).get("taints")), "gpu-3 tainted", 60
    )
    taint = devices(found)["gpu-3"]["taints"][0]
    assert (taint["key"], taint["value"], taint["effect"]) == (
        "gpu.nvidia.com/xid",
        "79",
        "NoSchedule",
    )
    assert "1 tainted unhealthy" in link(node)
    uuid = node.uuids()[3]
    assert node.gpudctl("device", "set-healthy", uuid).returncode == 0
    wait_slices(kube, lambda s: "taints" not in devices(s)["gpu-3"], "gpu-3 untainted")

    # Back to the device plugin (allocation.mode applies at a restart): the slices are
    # withdrawn as gpud starts, not left for the scheduler until kubelet wipes them.
    node.gpud.terminate()
    (short_tmp / "gpud.yaml").write_text(
        f"version: v1\nkubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
        f"paths:\n  podResourcesSocket: {node.podres_socket}\n"
    )
    node.gpud.start()
    node.gpud.wait_ready()
    wait_slices(kube, lambda s: not s, "the slices withdrawn")
    assert "DRA:" not in link(node)


def fill(backend: SimBackend, index: int, name: str) -> None:
    """As many instances of profile ``name`` as GPU ``index`` holds (``all_of`` for profiles
    allowed fewer times than they have placements, like ``1g.5gb+me``)."""
    backend.set_mig_mode(index, True)
    backend.reset_gpu(index)
    profile = next(p for p in backend.mig_state(index).profiles if p.name == name)
    assert profile.full_ci is not None
    for placement in profile.placements[: profile.max_count]:
        gi = backend.create_gpu_instance(index, profile.profile_id, placement)
        backend.create_compute_instance(index, gi.gi_id, profile.full_ci.profile_id)


def _machines() -> list[str]:
    return [*MACHINES, *(f"{m}:16" for m in MODELS)]


def test_the_api_server_accepts_the_slices_of_every_simulated_machine(
    kube: Cluster, tmp_path: Path
) -> None:
    """Every machine whole, and every MIG-capable one cut into each profile that fills it, with
    and without an unhealthy GPU (taints: 64 devices a slice): a server dry-run create with the
    node's identity accepts every slice."""
    bodies = []
    for spec in _machines():
        backend = SimBackend(spec, tmp_path / spec.replace(":", "-"))
        backend.open()
        states = [snapshot(backend, unhealthy={backend.gpus()[0].uuid: "critical XID 48"})]
        profiles = backend.mig_state(0).profiles if backend.gpus()[0].mig.capable else ()
        for n, profile in enumerate(profiles):
            cut = SimBackend(spec, tmp_path / f"{spec.replace(':', '-')}-{n}")
            cut.open()
            for gpu in cut.gpus():
                fill(cut, gpu.index, profile.name)
            states.append(snapshot(cut))
            states.append(snapshot(cut, unhealthy={cut.gpus()[0].uuid: "critical XID 48"}))
        for state in states:
            specs = slice_specs(dra_devices(state, DRIVER), DRIVER, kube.node)
            bodies += plan(specs, (), DRIVER, kube.node).creates
    assert len(bodies) > 40
    items = {"apiVersion": "v1", "kind": "List", "items": bodies}
    out = kube.kubectl(
        "create", "--dry-run=server", "-o", "name", "-f", "-",
        kubeconfig=kube.node_kubeconfig, stdin=json.dumps(items),
    )  # fmt: skip
    assert out.count("resourceslice.resource.k8s.io/") == len(bodies)


def test_manifests_for_another_driver_name_are_accepted_and_a_bad_name_is_refused(
    kube: Cluster,
) -> None:
    def manifests(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gpud.cli.gpudctl", "dra", "manifests", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    out = manifests("--driver-name", "gpu.example.com")
    assert out.returncode == 0, out.stderr
    applied = kube.kubectl("apply", "--dry-run=server", "-f", "-", stdin=out.stdout)
    assert "deviceclass.resource.k8s.io/gpu.example.com created (server dry run)" in applied
    assert "deviceclass.resource.k8s.io/mig.example.com created (server dry run)" in applied

    bad = manifests("--driver-name", "GPU_Driver")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "'GPU_Driver' is not a DRA driver name" in bad.stderr
