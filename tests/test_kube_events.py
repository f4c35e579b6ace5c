"""gpud's Events and its GPUHealthy condition on its own Node, against a real kube-apiserver
(kubekit: Node authorizer and NodeRestriction) and a real gpud with the node's kubelet identity.
What the cluster sees is read with the administrator's kubeconfig, as ``kubectl describe node``
would. One API server serves the module; the test that stops it runs last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud._proto.gpud.v1 import gpud_pb2
from gpud.kube.ratelimit import Limits
from tests.support.kubekit import Cluster, running
from tests.support.mignode import MigNode, start, stopped_after
from tests.support.podresources import pod
from tests.test_kube_link import config, link

MIG_1G = "nvidia.com/mig-1g.5gb"


@pytest.fixture(scope="module")
def kube() -> Iterator[Cluster]:
    with running("gpud-kube-ev-") as found:
        yield found


@pytest.fixture
def nodes(kube: Cluster) -> Iterator[list[MigNode]]:
    # Each test reads the Events of its own gpud: those of the one before are removed.
    kube.kubectl("delete", "events", "-n", "default", "--all", "--wait=false")
    with stopped_after() as started:
        yield started


def condition(kube: Cluster) -> dict[str, Any] | None:
    obj = json.loads(kube.kubectl("get", "node", kube.node, "-o", "json"))
    return next(
        (c for c in obj["status"].get("conditions") or () if c["type"] == "GPUHealthy"), None
    )


def wait_condition(
    kube: Cluster, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = condition(kube)
        if found is not None and check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"GPUHealthy never became {what} within {timeout} s: {found}")
        time.sleep(0.05)


def reasons(found: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in found]


def started_with_link(kube: Cluster, root: Path, spec: str, nodes: list[MigNode]) -> MigNode:
    node = start(root, spec, config(kube.node_kubeconfig))
    nodes.append(node)
    wait_condition(kube, lambda c: c["status"] == "True", 30, "True at start")
    return node


def test_an_xid_is_a_warning_with_its_meaning_and_gpuhealthy_false_set_healthy_brings_both_back(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started_with_link(kube, short_tmp, "a100-40gb:2", nodes)
    healthy = condition(kube)
    assert healthy is not None and healthy["reason"] == "GPUsHealthy"
    assert healthy["message"] == "2 GPUs healthy"
    # kubelet's own condition (set at registration) is untouched by gpud's apply.
    obj = json.loads(kube.kubectl("get", "node", kube.node, "-o", "json"))
    assert "Ready" in {c["type"] for c in obj["status"]["conditions"]}
    uuid = node.gpud.status().gpus[1].uuid
    node_uid = obj["metadata"]["uid"]

    assert node.gpudctl("debug", "inject-xid", "--gpu", "1", "--xid", "79").returncode == 0
    # Within a second of the XID (the bound also covers kubectl's own start).
    found = kube.wait_events(lambda e: "GPUXidError" in reasons(e), 3.0, "XID Event")
    xid = next(e for e in found if e["reason"] == "GPUXidError")
    assert xid["type"] == "Warning"
    assert xid["message"].startswith(
        f"XID 79 on GPU 1 ({uuid}): GPU has fallen off the bus (no longer reachable over PCIe)."
    )
    assert f"gpudctl device set-healthy {uuid}" in xid["message"]
    assert xid["involvedObject"] == {
        "apiVersion": "v1", "kind": "Node", "name": kube.node, "uid": node_uid,
    }  # fmt: skip
    assert xid["source"] == {"component": "gpud", "host": kube.node}
    assert xid["reportingInstance"] == kube.node and xid["count"] == 1
    down = wait_condition(kube, lambda c: c["status"] == "False", 3.0, "False")
    assert down["reason"] == "GPUUnhealthy"
    assert down["message"] == f"1 of 2 devices out of service: {uuid} (GPU 1): critical XID 79"
    went_down = down["lastTransitionTime"]

    assert node.gpudctl("device", "set-healthy", uuid).returncode == 0
    found = kube.wait_events(lambda e: "GPUBackInService" in reasons(e), 3.0, "back Event")
    back = next(e for e in found if e["reason"] == "GPUBackInService")
    assert back["type"] == "Normal"
    assert back["message"].startswith(f"GPU 1 ({uuid}) is back in service (out before: critical")
    up = wait_condition(kube, lambda c: c["status"] == "True", 3.0, "True again")
    assert up["lastTransitionTime"] >= went_down
    # One Event each: an application XID sends none, and nothing else was said.
    assert node.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "13").returncode == 0
    time.sleep(1.0)
    assert reasons(kube.events()) == ["GPUXidError", "GPUBackInService"]
    detail = link(node)["detail"]
    assert "GPUHealthy=True" in detail and "Events: 2 sent" in detail


def test_mig_applies_say_started_and_succeeded_and_a_refusal_names_the_pod(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started_with_link(kube, short_tmp, "a100-40gb:2", nodes)
    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    found = kube.wait_events(lambda e: "MigApplySucceeded" in reasons(e), 5.0, "MIG success")
    assert reasons(found) == ["MigApplyStarted", "MigApplySucceeded"]
    started, done = found
    assert started["type"] == done["type"] == "Normal"
    assert started["message"].startswith("applying MIG layout 'all-1g.5gb'")
    assert "32 NVML calls on GPUs 0, 1" in started["message"]
    assert done["message"].startswith("MIG layout 'all-1g.5gb'")
    assert "applied on GPUs 0, 1 with 32 NVML calls" in done["message"]
    wait_condition(kube, lambda c: c["message"] == "2 GPUs healthy, 14 MIG devices", 5, "MIG")

    devices = node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
    held = sorted(devices)[0]
    assert node.podres is not None
    node.podres.pods = [pod("ml", "train-0", main={MIG_1G: [held]})]
    assert node.gpudctl("mig", "apply", "-c", "all-disabled").returncode == 1
    found = kube.wait_events(lambda e: "MigApplyRefused" in reasons(e), 5.0, "refusal")
    refused = found[-1]
    assert refused["type"] == "Warning"
    assert refused["message"].startswith(
        "MIG layout 'all-disabled' (from gpud's bundled layouts, chosen by gpudctl mig apply) "
        "refused, nothing was changed: "
        "the layout change would take devices away from running work"
    )
    assert f"In use by: ml/train-0/main uses {held}" in refused["message"]
    # A dry run is not an apply: it says nothing.
    assert node.gpudctl("mig", "apply", "-c", "all-balanced", "--dry-run").returncode == 0
    time.sleep(1.0)
    assert reasons(kube.events()) == ["MigApplyStarted", "MigApplySucceeded", "MigApplyRefused"]


def test_an_xid_storm_stays_within_the_rate_limit_and_says_how_many_it_held_back(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started_with_link(kube, short_tmp, "dgx-a100", nodes)
    limits = Limits()
    began = time.monotonic()
    storm = 400
    for i in range(storm):
        node.gpud.stub.InjectXid(gpud_pb2.InjectXidRequest(gpu_index=i % 8, xid=48), timeout=5)
    wait_condition(kube, lambda c: c["message"].startswith("8 of 8 devices out"), 10, "False")
    time.sleep(2.0)
    elapsed = time.monotonic() - began
    found = [e for e in kube.events() if e["reason"] == "GPUXidError"]
    cap = limits.node_burst + int(elapsed / limits.node_every_s) + 1
    assert limits.node_burst <= len(found) <= cap, (len(found), elapsed)
    assert sum(e["count"] for e in found) <= storm
    detail = link(node)["detail"]
    held = int(detail.split(" held back by the rate limit")[0].rsplit(" ", 1)[1])
    assert held >= storm - cap, detail
    assert "Event rate limit: holding back GPUXidError Events about GPU-" in node.gpud.log()
    # What was held back goes out once the limits allow, saying how many it stands for.
    node_wait = limits.node_every_s + 1
    found = kube.wait_events(
        lambda e: any("were held back by gpud's Event rate limit" in x["message"] for x in e),
        node_wait,
        "a summing-up Event",
    )
    summary = next(e for e in found if "held back" in e["message"])
    assert summary["count"] > 1 and summary["firstTimestamp"] <= summary["lastTimestamp"]


def test_lasttransitiontime_moves_only_with_the_status_across_a_restart_of_gpud(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started_with_link(kube, short_tmp, "a100-40gb:2", nodes)
    assert node.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "48").returncode == 0
    down = wait_condition(kube, lambda c: c["status"] == "False", 5, "False")
    time.sleep(1.1)  # the stamps have whole seconds
    node.gpud.terminate()
    node.gpud.start()
    node.gpud.wait_ready()
    # gpud starts with every GPU healthy again (health is not kept across restarts): True, a
    # transition. A second restart changes nothing: a new heartbeat, the same transition.
    up = wait_condition(kube, lambda c: c["status"] == "True", 10, "True after the restart")
    assert up["lastTransitionTime"] > down["lastTransitionTime"]
    time.sleep(1.1)
    node.gpud.terminate()
    node.gpud.start()
    node.gpud.wait_ready()
    again = wait_condition(
        kube, lambda c: c["lastHeartbeatTime"] > up["lastHeartbeatTime"], 10, "applied again"
    )
    assert again["status"] == "True"
    assert again["lastTransitionTime"] == up["lastTransitionTime"]


def test_the_node_deleted_and_registered_again_gets_the_condition_and_labels_again(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started_with_link(kube, short_tmp, "a100-40gb:2", nodes)
    kube.wait_labels(lambda got: got.get("nvidia.com/gpu.count") == "2", what="labels")
    obj = json.loads(kube.kubectl("get", "node", kube.node, "-o", "json"))
    kube.kubectl("delete", "node", kube.node)
    fresh = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": kube.node}}
    (short_tmp / "node.json").write_text(json.dumps(fresh))
    kube.kubectl("create", "-f", str(short_tmp / "node.json"))
    assert condition(kube) is None
    # The next change finds the new Node (the heartbeat would, later).
    assert node.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "79").returncode == 0
    wait_condition(kube, lambda c: c["status"] == "False", 5, "False on the new Node")
    labels = kube.wait_labels(lambda got: got.get("nvidia.com/gpu.count") == "2", what="again")
    assert labels["nvidia.com/gpu.product"]
    new_uid = json.loads(kube.kubectl("get", "node", kube.node, "-o", "json"))["metadata"]["uid"]
    assert new_uid != obj["metadata"]["uid"]
    assert "Node gpu-node-1 was deleted; looking it up again" in node.gpud.log()


def test_events_during_an_api_outage_arrive_once_each_after_it(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """Last in the module: it stops the shared API server and starts it again."""
    node = started_with_link(kube, short_tmp, "a100-40gb:2", nodes)
    uuids = [g.uuid for g in node.gpud.status().gpus]
    kube.down()
    try:
        assert node.gpudctl("debug", "inject-xid", "--gpu", "0", "--xid", "79").returncode == 0
        assert node.gpudctl("device", "set-healthy", uuids[0]).returncode == 0
        assert node.gpudctl("debug", "inject-xid", "--gpu", "1", "--xid", "94").returncode == 0
        # Kept by the link (retrying with backoff), not lost and not sent.
        deadline = time.monotonic() + 20
        while "3 waiting" not in (found := link(node))["detail"]:
            assert time.monotonic() < deadline, found
            time.sleep(0.2)
        assert found["state"] == "degraded" and "cannot reach the API server" in found["error"]
    finally:
        kube.up()
    found = kube.wait_events(lambda e: len(e) >= 3, 60, "the Events held during the outage")
    time.sleep(2.0)
    found = kube.events()
    assert reasons(found) == ["GPUXidError", "GPUBackInService", "GPUXidError"], found
    assert found[0]["message"].startswith(f"XID 79 on GPU 0 ({uuids[0]})")
    assert found[2]["message"].startswith(f"XID 94 on GPU 1 ({uuids[1]}): contained ECC error")
    wait_condition(kube, lambda c: uuids[1] in c["message"] and c["status"] == "False", 10, "F")
