"""Prepare and Unprepare of claims the real scheduler allocated, through kubelet's DRA calls.

One kubekit cluster with the real kube-scheduler and ResourceClaim controller serves the module.
The node ``gpu-node-1`` publishes a ResourceSlice with NVIDIA's device names (``gpu-<minor>``)
here, with its own kubelet identity; pods with ResourceClaimTemplates get claims the scheduler
allocates from it with real CEL. gpud reads each claim with the same node identity, as on a
node, and the kubelet stand-in sends the calls over the real DRA socket.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.draclaims import allocated_device, claimed_pod, device_class, node_slice
from tests.support.drakubelet import Claim, FakeDraKubelet
from tests.support.kubekit import Cluster, running
from tests.support.mignode import MigNode, start, stopped_after

DRIVER = "gpu.nvidia.com"
OTHER = "nic.example.com"


@pytest.fixture(scope="module")
def kube() -> Iterator[Cluster]:
    with running("gpud-kube-", with_parts="scheduler,claims") as found:
        node2 = found.add_node("gpu-node-2")
        gpus = [f"gpu-{i}" for i in range(8)]
        for obj, who in (
            (node_slice(found.node, DRIVER, gpus), found.node_kubeconfig),
            (node_slice(found.node, OTHER, ["nic-0"]), found.node_kubeconfig),
            (node_slice("gpu-node-2", DRIVER, gpus), node2),
            (device_class(DRIVER), None),
            (device_class(OTHER), None),
        ):
            found.kubectl("create", "-f", "-", kubeconfig=who, stdin=json.dumps(obj))
        yield found


@pytest.fixture
def nodes() -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def dra_node(root: Path, kube: Cluster) -> MigNode:
    config = (
        f"version: v1\nallocation:\n  mode: dra\ndra:\n  cdiDir: {root / 'cdi'}\n"
        f"kubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
    )
    return start(root, "dgx-a100", config)


def spec_of(root: Path, claim: Claim) -> dict[str, Any]:
    path = root / "cdi" / f"k8s.gpu.nvidia.com-claim_{claim.uid}.yaml"
    return dict(yaml.safe_load(path.read_text()))


def checkpoint(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / "state" / "dra-checkpoint.json").read_text()))


def test_prepare_answers_cdi_ids_of_the_allocated_gpu_again_after_a_reboot_and_unprepare_removes_it(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    with FakeDraKubelet(short_tmp) as kubelet:
        nodes.append(dra_node(short_tmp, kube))
        kubelet.wait_registered(DRIVER)
        claim = claimed_pod(kube, DRIVER)
        device = allocated_device(kube, claim)
        minor = int(device.removeprefix("gpu-"))

        answer = kubelet.prepare(DRIVER, claim)[claim.uid]
        cdi_id = f"k8s.gpu.nvidia.com/claim={claim.uid}-{device}"
        assert answer == {
            "error": "",
            "devices": [
                {"requestNames": ["gpu"], "pool": "gpu-node-1", "device": device,
                 "cdiDeviceIDs": [cdi_id]}
            ],
        }  # fmt: skip
        spec = spec_of(short_tmp, claim)
        assert_valid_cdi(spec)
        # The ID resolves in the spec, to that GPU's device node and no other.
        (entry,) = [d for d in spec["devices"] if f"{spec['kind']}={d['name']}" == cdi_id]
        assert entry["containerEdits"]["deviceNodes"] == [{"path": f"/dev/nvidia{minor}"}]
        assert claim.uid in checkpoint(short_tmp)["preparedClaims"]

        # kubelet restarted: the same answer. After a reboot /var/run/cdi is empty: the spec is
        # written again, the answer unchanged.
        assert kubelet.prepare(DRIVER, claim)[claim.uid] == answer
        (short_tmp / "cdi" / f"k8s.gpu.nvidia.com-claim_{claim.uid}.yaml").unlink()
        assert kubelet.prepare(DRIVER, claim)[claim.uid] == answer
        assert spec_of(short_tmp, claim) == spec

        assert kubelet.unprepare(DRIVER, claim) == {claim.uid: ""}
        assert list((short_tmp / "cdi").iterdir()) == []
        assert checkpoint(short_tmp)["preparedClaims"] == {}
        # Repeated: nothing left to do, not an error.
        assert kubelet.unprepare(DRIVER, claim) == {claim.uid: ""}


def test_each_claim_gets_its_own_answer_and_bad_ones_fail_alone(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    with FakeDraKubelet(short_tmp) as kubelet:
        nodes.append(dra_node(short_tmp, kube))
        kubelet.wait_registered(DRIVER)
        good = claimed_pod(kube, DRIVER)
        other_driver = claimed_pod(kube, OTHER)
        other_node = claimed_pod(kube, DRIVER, node="gpu-node-2")
        missing = Claim("default", "no-such-claim", str(uuid.uuid4()))
        replaced = Claim("default", good.name, str(uuid.uuid4()))

        answer = kubelet.prepare(DRIVER, good, other_driver, other_node, missing, replaced)
        assert answer[good.uid]["error"] == "" and len(answer[good.uid]["devices"]) == 1
        assert f"has no device of driver {DRIVER}" in answer[other_driver.uid]["error"]
        assert OTHER in answer[other_driver.uid]["error"]
        # gpu-node-1's identity may not read a claim of a pod on gpu-node-2.
        assert "403" in answer[other_node.uid]["error"]
        # The Node authorizer cannot tell a missing claim from a foreign one: 403 as well.
        assert "no-such-claim (403): it does not exist" in answer[missing.uid]["error"]
        assert "was replaced" in answer[replaced.uid]["error"]
        for failed in (other_driver, other_node, missing, replaced):
            assert answer[failed.uid]["devices"] == []
        specs = sorted(p.name for p in (short_tmp / "cdi").iterdir())
        assert specs == [f"k8s.gpu.nvidia.com-claim_{good.uid}.yaml"]
        assert list(checkpoint(short_tmp)["preparedClaims"]) == [good.uid]


def test_after_kill_9_between_prepare_and_unprepare_the_checkpoint_still_cleans_up(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    with FakeDraKubelet(short_tmp) as kubelet:
        node = dra_node(short_tmp, kube)
        nodes.append(node)
        kubelet.wait_registered(DRIVER)
        claim = claimed_pod(kube, DRIVER)
        answer = kubelet.prepare(DRIVER, claim)[claim.uid]
        assert answer["error"] == ""

        node.gpud.kill()
        node.gpud.start()
        node.gpud.wait_ready()
        kubelet.wait_registered(DRIVER, count=2)
        # The claim is gone from the API server by now; the checkpoint answers for it.
        kube.kubectl("delete", "resourceclaim", claim.name, "--wait=false")
        assert kubelet.prepare(DRIVER, claim)[claim.uid] == answer
        assert kubelet.unprepare(DRIVER, claim) == {claim.uid: ""}
        assert list((short_tmp / "cdi").iterdir()) == []
        assert checkpoint(short_tmp)["preparedClaims"] == {}


def assert_valid_cdi(spec: dict[str, Any]) -> None:
    """The rules of the CDI specification (v0.5.0) a runtime applies when it loads a spec:
    a known version, kind ``vendor/class`` with their character sets, device names of the
    allowed characters, absolute device-node paths, env as KEY=VALUE."""
    import re

    assert spec["cdiVersion"] in {"0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0"}
    vendor, klass = spec["kind"].split("/")
    assert re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]*[a-zA-Z0-9])?", vendor)
    assert re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9_-]*[a-zA-Z0-9])?", klass)
    assert spec["devices"], "a spec needs at least one device"
    for device in spec["devices"]:
        assert re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9_.:-]*[a-zA-Z0-9])?", device["name"])
        for node in device["containerEdits"]["deviceNodes"]:
            assert node["path"].startswith("/")
    for env in spec.get("containerEdits", {}).get("env", []):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", env)
    assert set(spec) <= {"cdiVersion", "kind", "devices", "containerEdits", "annotations"}
