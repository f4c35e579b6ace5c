"""MIG layouts chosen by the Node label nvidia.com/mig.config, through a real API server.

A real kube-apiserver (kubekit, Node authorizer and NodeRestriction), a real gpud process with the
node's kubelet identity on the simulated dgx-a100, kubelet's device manager stand-in and its
PodResources API. The administrator labels the Node as an operator would with kubectl; what the
cluster sees is read back with the administrator's kubeconfig, and the state label's history with
a real ``kubectl get --watch``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kubekit import Cluster, running
from tests.support.mignode import MigNode, start, stopped_after
from tests.support.podresources import pod

MIG_1G = "nvidia.com/mig-1g.5gb"
CONFIG = "nvidia.com/mig.config"
STATE = "nvidia.com/mig.config.state"


@pytest.fixture(scope="module")
def kube() -> Iterator[Cluster]:
    with running("gpud-kube-mig-") as found:
        yield found


@pytest.fixture
def nodes(kube: Cluster) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started
    # Each test starts from a Node without the layout request or its state.
    kube.kubectl("label", "node", kube.node, f"{CONFIG}-", f"{STATE}-")


class StateHistory:
    """Every value the state label takes, as ``kubectl get node --watch`` prints them."""

    def __init__(self, kube: Cluster) -> None:
        assert kube.bin is not None
        jsonpath = "{.metadata.labels.nvidia\\.com/mig\\.config\\.state}{'\\n'}"
        self.proc = subprocess.Popen(
            [
                str(kube.bin / "kubectl"),
                "--kubeconfig",
                str(kube.admin),
                "get",
                "node",
                kube.node,
                "--watch",
                "-o",
                f"jsonpath={jsonpath}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def values(self) -> list[str]:
        """The distinct values in order (a watch repeats one for each other change)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        seen: list[str] = []
        for line in out.splitlines():
            if line and (not seen or seen[-1] != line):
                seen.append(line)
        return seen


def config(kube: Cluster, wait_for_pods: int = 300, extra: str = "") -> str:
    return (
        f"version: v1\nkubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
        f"mig:\n  byLabel:\n    waitForPods: {wait_for_pods}\n{extra}"
    )


def label(kube: Cluster, value: str) -> None:
    kube.kubectl("label", "node", kube.node, f"{CONFIG}={value}", "--overwrite")


def wait_state(kube: Cluster, want: str, timeout: float = 30.0) -> dict[str, str]:
    return kube.wait_labels(lambda got: got.get(STATE) == want, timeout, f"{STATE}={want}")


def link(node: MigNode) -> dict[str, Any]:
    out = node.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    return next(p for p in json.loads(out.stdout)["publishers"] if p["name"] == "kubernetes")


def wait_link(node: MigNode, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not check(found := link(node)):
        assert time.monotonic() < deadline, f"kubernetes publisher never matched: {found}"
        time.sleep(0.2)
    return found


def started(kube: Cluster, root: Path, cfg: str) -> MigNode:
    node = start(root, "dgx-a100", cfg)
    wait_link(node, lambda p: f"no {CONFIG} on the Node" in p["detail"])
    return node


def test_the_label_drives_pending_then_success_and_wins_over_a_local_apply(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started(kube, short_tmp, config(kube))
    nodes.append(node)
    history = StateHistory(kube)
    label(kube, "all-1g.5gb")
    wait_state(kube, "success")
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)
    assert history.values() == ["pending", "success"]
    shown = node.state()
    assert shown["selected_config"] == "all-1g.5gb"
    assert shown["selected_origin"] == "the Node label nvidia.com/mig.config"
    assert shown["label"] == "all-1g.5gb"
    table = node.gpudctl("mig", "show").stdout
    assert "chosen by the Node label nvidia.com/mig.config" in table
    assert "managed by the Node label nvidia.com/mig.config=all-1g.5gb" in table
    assert f"{CONFIG}=all-1g.5gb success" in link(node)["detail"]

    # The cluster's choice wins while the label is set: a local apply changes nothing.
    code, answer = node.mig("apply", "-c", "all-disabled")
    assert code != 0
    assert "chosen by the Node label nvidia.com/mig.config=all-1g.5gb" in answer["message"]
    assert len(node.kubelet.devices(MIG_1G)) == 56
    # A dry run is only a question, still answered.
    assert node.mig("apply", "-c", "all-disabled", "--dry-run")[1]["result"] == "planned"

    # Without the label, the node is the operator's again; the layout stays as it was.
    kube.kubectl("label", "node", kube.node, f"{CONFIG}-")
    wait_link(node, lambda p: f"no {CONFIG} on the Node" in p["detail"])
    assert node.state()["label"] == ""
    assert len(node.kubelet.devices(MIG_1G)) == 56
    code, answer = node.mig("apply", "-c", "all-disabled")
    assert code == 0, answer
    assert node.state()["selected_origin"] == "gpudctl mig apply"


def test_turning_the_protocol_off_by_reload_gives_the_node_back_and_ignores_the_label(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started(kube, short_tmp, config(kube))
    nodes.append(node)
    label(kube, "all-1g.5gb")
    wait_state(kube, "success")
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)
    (short_tmp / "gpud.yaml").write_text(
        f"version: v1\nkubernetes:\n  kubeconfig: {kube.node_kubeconfig}\n"
        "mig:\n  byLabel:\n    enabled: false\n"
        f"paths:\n  podResourcesSocket: {node.podres_socket}\n"
    )
    assert node.gpudctl("config", "reload").returncode == 0
    wait_link(node, lambda p: CONFIG not in p["detail"])
    assert node.state()["label"] == ""
    # The label no longer chooses: a change is not followed, a local apply is the node's own.
    label(kube, "all-disabled")
    time.sleep(1.5)
    assert kube.labels()[STATE] == "success"
    assert len(node.kubelet.devices(MIG_1G)) == 56
    code, answer = node.mig("apply", "-c", "all-2g.10gb")
    assert code == 0, answer
    assert node.state()["selected_origin"] == "gpudctl mig apply"


def test_a_node_whose_driver_comes_later_applies_the_label_then_not_failed_before(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """First boot: cloud-init is still installing the driver when gpud and the API link come
    up. The label waits for the GPUs instead of failing, and is applied once they are there."""
    from gpud.hw.sim.driver import DriverState, control_node, set_driver

    label(kube, "all-1g.5gb")
    set_driver(short_tmp / "state", DriverState.NOT_LOADED)
    node = start(short_tmp, "dgx-a100", config(kube))
    nodes.append(node)
    found = wait_link(node, lambda p: "waiting for the GPUs: no driver" in p["detail"])
    assert f"{CONFIG}=all-1g.5gb seen" in found["detail"]
    time.sleep(1.0)
    assert STATE not in kube.labels()  # neither pending nor failed while there is no driver

    set_driver(short_tmp / "state", DriverState.LOADED)  # the driver is installed and loads
    control_node(short_tmp / "state").touch()
    wait_state(kube, "success", timeout=60)
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)


def test_a_layout_that_does_not_fit_or_does_not_exist_is_failed_and_changes_nothing(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    layouts = short_tmp / "layouts.yaml"
    layouts.write_text(
        "version: v1\nmig-configs:\n"
        "  too-many:\n    - devices: all\n      mig-enabled: true\n"
        '      mig-devices: {"3g.20gb": 3}\n'
        "  all-1g.5gb:\n    - devices: all\n      mig-enabled: true\n"
        '      mig-devices: {"1g.5gb": 7}\n'
    )
    node = started(kube, short_tmp, config(kube, extra=f"  configFile: {layouts}\n"))
    nodes.append(node)
    label(kube, "too-many")
    wait_state(kube, "failed")
    found = wait_link(node, lambda p: f"{CONFIG}=too-many failed" in p["detail"])
    assert "does not fit this node; nothing was changed" in found["detail"]
    # kubectl describe node says why.
    refused = kube.wait_events(
        lambda e: any("'too-many'" in x["message"] for x in e), 10, "the refusal Event"
    )
    event = next(x for x in refused if "'too-many'" in x["message"])
    assert event["reason"] == "MigApplyRefused" and event["type"] == "Warning"
    assert "chosen by the Node label nvidia.com/mig.config" in event["message"]
    assert "does not fit this node" in event["message"]
    assert node.kubelet.devices("nvidia.com/gpu")  # still whole GPUs
    assert not node.kubelet.devices(MIG_1G)

    label(kube, "no-such-layout")
    found = wait_link(node, lambda p: f"{CONFIG}=no-such-layout failed" in p["detail"])
    assert "no-such-layout" in found["detail"]
    assert kube.labels()[STATE] == "failed"

    # A fitting layout from the same file after two failures: the label recovers by itself.
    label(kube, "all-1g.5gb")
    wait_state(kube, "success")
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)


def partitioned_with_a_pod(
    kube: Cluster, root: Path, nodes: list[MigNode], wait_for_pods: int
) -> tuple[MigNode, str]:
    """gpud on the dgx-a100 cut into all-1g.5gb by the label, with the pod ml/train-0 holding
    one of its MIG devices (as kubelet's PodResources reports it); the node and that device."""
    node = started(kube, root, config(kube, wait_for_pods=wait_for_pods))
    nodes.append(node)
    assert node.podres is not None
    label(kube, "all-1g.5gb")
    wait_state(kube, "success")
    held = sorted(node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56))[0]
    node.podres.pods = [pod("ml", "train-0", main={MIG_1G: [held]})]
    return node, held


def test_pods_holding_devices_are_waited_for_then_failed_by_name(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node, held = partitioned_with_a_pod(kube, short_tmp, nodes, wait_for_pods=2)

    started_at = time.monotonic()
    label(kube, "all-disabled")
    wait_state(kube, "pending", timeout=10)
    wait_state(kube, "failed", timeout=30)
    assert time.monotonic() - started_at >= 2  # it waited before giving up
    found = link(node)
    assert "ml/train-0/main uses " + held in found["detail"]
    assert "after waiting 2 s" in found["detail"]
    # The Events say it waited, then gave up, naming the pod both times.
    named = [e for e in kube.events() if "ml/train-0/main" in e["message"] and held in e["message"]]
    assert [e["reason"] for e in named][-2:] == ["MigApplyWaiting", "MigApplyRefused"], named
    # Nothing was taken away from the pod.
    assert held in node.kubelet.devices(MIG_1G)


def test_pods_that_leave_while_waited_for_let_the_layout_through(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node, _ = partitioned_with_a_pod(kube, short_tmp, nodes, wait_for_pods=120)

    history = StateHistory(kube)
    label(kube, "all-disabled")
    node.gpud.wait_log("waits up to")
    assert kube.labels()[STATE] == "pending"
    assert "train-0" in node.gpud.log()
    node.podres.pods = []  # the job finished
    wait_state(kube, "success")
    node.kubelet.wait_devices("nvidia.com/gpu", lambda d: len(d) == 8)
    assert history.values() == ["success", "pending", "success"]


def test_a_new_value_while_pods_are_waited_for_replaces_the_old_one(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node, _ = partitioned_with_a_pod(kube, short_tmp, nodes, wait_for_pods=300)
    label(kube, "all-disabled")
    node.gpud.wait_log("waits up to")
    # The operator changes their mind: back to the layout the GPUs hold, at once.
    label(kube, "all-1g.5gb")
    wait_state(kube, "success", timeout=10)
    assert len(node.kubelet.devices(MIG_1G)) == 56


def test_the_api_server_restarting_mid_change_the_change_completes_once(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """The apply waits for a pod; the API server goes away; the pod leaves and the apply runs
    with nobody to tell; the API server returns and the state label ends right, without a
    second apply."""
    node, _ = partitioned_with_a_pod(kube, short_tmp, nodes, wait_for_pods=300)
    label(kube, "all-2g.10gb")
    node.gpud.wait_log("waits up to")
    kube.down()
    try:
        node.podres.pods = []
        node.kubelet.wait_devices("nvidia.com/mig-2g.10gb", lambda d: len(d) == 24, timeout=30)
        wait_link(node, lambda p: "again in" in p["detail"] or p["state"] == "degraded")
    finally:
        kube.up()
    wait_state(kube, "success", timeout=60)
    log = node.gpud.log()
    assert log.count("MIG layout 'all-2g.10gb' applied") == 1, log
    assert log.count("MIG layout 'all-1g.5gb' applied") == 1, log


def test_a_node_deleted_and_registered_again_gets_labels_and_its_request_handled(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = started(kube, short_tmp, config(kube))
    nodes.append(node)
    kube.wait_labels(lambda got: got.get("nvidia.com/gpu.count") == "8", what="gpud's labels")
    saved = json.loads(kube.kubectl("get", "node", kube.node, "-o", "json"))

    def register_again(layout: str) -> None:
        """Delete the Node and register it again (as kubelet would), asking for ``layout``
        and without the old Node's state label."""
        kube.kubectl("delete", "node", kube.node)
        fresh = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": kube.node,
                "labels": {"kubernetes.io/hostname": kube.node, CONFIG: layout},
            },
            "status": saved["status"],
        }
        manifest = short_tmp / "node.json"
        manifest.write_text(json.dumps(fresh))
        kube.kubectl("create", "-f", str(manifest))

    def handled(got: dict[str, str]) -> bool:
        """The request done and gpud's labels back (two writes, in either order)."""
        return got.get(STATE) == "success" and got.get("nvidia.com/gpu.count") == "8"

    register_again("all-1g.5gb")
    kube.wait_labels(handled, 40, "success and gpud's labels")
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)
    # Again, with the same value as the Node that went: a new Node, so a new request.
    register_again("all-1g.5gb")
    kube.wait_labels(handled, 40, "success and gpud's labels again")


def test_the_api_server_down_at_start_kubelet_served_then_everything_catches_up(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """Last in the module: it stops the shared API server. A node booting while the control
    plane is away serves kubelet at once, says the link is down, and once the API server is
    back applies its labels and the layout the Node asks for."""
    label(kube, "all-1g.5gb")
    kube.down()
    try:
        node = start(short_tmp, "dgx-a100", config(kube))
        nodes.append(node)
        node.kubelet.wait_devices("nvidia.com/gpu", lambda d: len(d) == 8)
        found = wait_link(node, lambda p: p["state"] == "degraded")
        assert "cannot reach the API server at https://127.0.0.1:" in found["error"]
    finally:
        kube.up()
    labels = wait_state(kube, "success", timeout=60)
    assert labels["nvidia.com/gpu.count"] == "8"
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 56)
    wait_link(node, lambda p: p["state"] == "ok", timeout=30)
