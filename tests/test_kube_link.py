"""gpud on the Kubernetes API: the kubelet's credentials, and gpud's labels on its own Node.

Against a real kube-apiserver (shared/tools/kube/kubekit: Node authorizer and NodeRestriction as
kubeadm runs them) and a real gpud process with the node's kubelet identity; the administrator's
kubeconfig reads what the cluster sees. One API server serves the module.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.config.models import Kubernetes
from gpud.kube.access import Access, certificate_cn, kubeconfig_identity, resolve
from gpud.kube.client import explain
from gpud.kube.restriction import forbidden_to_kubelet, kubelet_allowed
from tests.support.kubekit import Cluster, running
from tests.support.mignode import MigNode, start, stopped_after

MIG_1G = "nvidia.com/mig-1g.5gb"


@pytest.fixture(scope="module")
def kube() -> Iterator[Cluster]:
    with running("gpud-kube-") as found:
        yield found


@pytest.fixture
def nodes() -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def status(node: MigNode) -> dict[str, Any]:
    out = node.gpudctl("status", "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def link(node: MigNode) -> dict[str, Any]:
    return next(p for p in status(node)["publishers"] if p["name"] == "kubernetes")


def wait_link(node: MigNode, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = link(node)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"kubernetes publisher never matched: {found}")
        time.sleep(0.2)


def config(kubeconfig: Path, node_name: str | None = None) -> str:
    text = f"version: v1\nkubernetes:\n  kubeconfig: {kubeconfig}\n"
    return text + (f"  nodeName: {node_name}\n" if node_name else "")


# ---- access: credentials and the node name (pure but for reading the files) --------------------


def test_the_node_name_comes_from_the_kubelet_certificate_else_the_hostname(
    kube: Cluster, tmp_path: Path
) -> None:
    kubelet_conf = tmp_path / "kubelet.conf"
    kubelet_conf.write_text(kube.node_kubeconfig.read_text())
    candidates = (("kubeadm", tmp_path / "missing"), ("kubelet", kubelet_conf))
    found = resolve(Kubernetes(), candidates=candidates, hostname=lambda: "Host-A")
    assert (found.kubeconfig, found.node_name, found.identity) == (
        kubelet_conf,
        "gpu-node-1",
        "system:node:gpu-node-1",
    )
    assert found.kubeconfig_source == "the kubelet's (kubelet)"
    # The configured name wins; a credential that is not a node's leaves the hostname.
    named = resolve(Kubernetes(nodeName="gpu-7"), candidates=candidates)
    assert (named.node_name, named.node_source) == ("gpu-7", "configured")
    admin = resolve(Kubernetes(kubeconfig=kube.admin), hostname=lambda: "Host-A")
    assert (admin.node_name, admin.node_source, admin.identity) == ("host-a", "the hostname", "")

    off = resolve(Kubernetes(), candidates=(("kubeadm", tmp_path / "missing"),))
    assert not off.on and not off.required and "no kubeconfig" in off.off_reason
    assert str(tmp_path / "missing") in off.off_reason
    assert resolve(Kubernetes(enabled=True), candidates=()).required
    assert "enabled is false" in resolve(Kubernetes(enabled=False)).off_reason
    broken = tmp_path / "broken"
    broken.write_text("current-context: nowhere\n")
    assert "current-context" in resolve(Kubernetes(kubeconfig=broken)).off_reason


def test_the_certificate_is_found_beside_its_key_as_kubeadm_stores_it(
    kube: Cluster, tmp_path: Path
) -> None:
    """kubeadm's kubelet.conf names kubelet-client-current.pem, the key and the certificate in
    one file, by a path relative to nothing in particular."""
    import yaml

    doc = yaml.safe_load(kube.node_kubeconfig.read_text())
    user = doc["users"][0]["user"]
    cert = base64.b64decode(user.pop("client-certificate-data"))
    key = base64.b64decode(user.pop("client-key-data"))
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "kubelet-client-current.pem").write_bytes(key + cert)
    user["client-certificate"] = "pki/kubelet-client-current.pem"
    user["client-key"] = "pki/kubelet-client-current.pem"
    path = tmp_path / "kubelet.conf"
    path.write_text(yaml.safe_dump(doc))
    assert kubeconfig_identity(path) == "system:node:gpu-node-1"
    with pytest.raises(ValueError, match="no PEM certificate"):
        certificate_cn(key)


# ---- NodeRestriction: the filter agrees with the real admission plugin ---------------------------

KEYS = [
    "nvidia.com/test.product",
    "example.com/pool",
    "accelerator",
    "feature.node.kubernetes.io/gpu",  # inside node.kubernetes.io: allowed
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "node.kubernetes.io/instance-type",
    "kubelet.kubernetes.io/q",
    "node-role.kubernetes.io/gpu",
    "node-restriction.kubernetes.io/pool",
    "x.node-restriction.kubernetes.io/pool",
    "example.kubernetes.io/z",
    "kubernetes.io/role",
    "k8s.io/z",
    "sub.k8s.io/z",
]


def test_the_label_filter_refuses_exactly_what_node_restriction_refuses(kube: Cluster) -> None:
    for key in KEYS:
        value = "gpu-node-1" if key == "kubernetes.io/hostname" else "a"
        try:
            kube.kubectl(
                "label", "node", kube.node, f"{key}={value}", "--overwrite",
                kubeconfig=kube.node_kubeconfig,
            )  # fmt: skip
            server_allows = True
        except AssertionError as exc:
            assert "is not allowed to modify labels" in str(exc), exc
            server_allows = False
        assert (forbidden_to_kubelet(key) == "") == server_allows, key
    kube.kubectl(
        "label", "node", kube.node, *(f"{k}-" for k in KEYS if k != "kubernetes.io/hostname")
    )
    allowed, warnings = kubelet_allowed({"nvidia.com/a": "1", "k8s.io/z": "1"})
    assert allowed == {"nvidia.com/a": "1"}
    assert warnings == (
        "label k8s.io/z is not sent to the API server: a kubelet credential may not set k8s.io "
        "labels (NodeRestriction allows of kubernetes.io and k8s.io only kubelet.kubernetes.io, "
        "node.kubernetes.io and the kubelet's own keys)",
    )


def test_errors_say_what_to_do() -> None:
    access = Access(Path("/k"), "configured", "gpu-node-1", "configured", "system:node:other")
    mismatch = explain(
        403, 'node "other" is not allowed to modify node "gpu-node-1"', access, "https://s"
    )
    assert mismatch.startswith(
        "system:node:other is not allowed to modify node gpu-node-1: node name / credential "
        "mismatch"
    )
    assert explain(404, "", access, "https://s").startswith("Node gpu-node-1 not found: ")
    assert "401 Unauthorized" in explain(401, "", access, "https://s")
    assert "429 Too Many Requests" in explain(429, "", access, "https://s")
    assert "kubectl label node gpu-node-1 KEY-" in explain(409, "conflict", access, "https://s")


# ---- through a running gpud --------------------------------------------------------------------


def test_labels_reach_the_node_follow_the_mig_layout_and_leave_others_alone(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    kube.kubectl("label", "node", kube.node, "example.com/team=ml", "--overwrite")
    node = start(short_tmp, "a100-40gb:2", config(kube.node_kubeconfig))
    nodes.append(node)
    labels = kube.wait_labels(
        lambda got: got.get("nvidia.com/gpu.count") == "2", what="gpud's labels"
    )
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert not any(k.startswith("nvidia.com/mig-") for k in labels)
    assert labels["example.com/team"] == "ml"
    found = wait_link(node, lambda p: "labels applied" in p["detail"])
    assert found["state"] == "ok"
    assert "node gpu-node-1 (the kubelet credential's) as system:node:gpu-node-1" in found["detail"]

    assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
    node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
    kube.wait_labels(lambda got: got.get("nvidia.com/mig-1g.5gb.count") == "14", what="MIG")
    # Back to whole GPUs: the MIG labels gpud published go, the administrator's stays.
    assert node.mig("apply", "-c", "all-disabled")[0] == 0
    labels = kube.wait_labels(
        lambda got: not any(k.startswith("nvidia.com/mig-") for k in got), what="MIG gone"
    )
    assert labels["example.com/team"] == "ml"
    assert labels["nvidia.com/gpu.replicas"] == "1"
    managers = json.loads(
        kube.kubectl("get", "node", kube.node, "-o", "json", "--show-managed-fields")
    )["metadata"]["managedFields"]
    assert "gpud" in {m["manager"] for m in managers}
    # An unchanged node sends nothing: a restart of the publisher aside, one apply per change.
    log = node.gpud.log()
    assert log.count(" labels to Node gpu-node-1") == 3, log


def test_a_credential_for_another_node_is_refused_and_status_says_so(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    other = kube.add_node("other")
    node = start(short_tmp, "a100-40gb:2", config(other, node_name=kube.node))
    nodes.append(node)
    found = wait_link(node, lambda p: p["state"] == "degraded")
    assert (
        "system:node:other is not allowed to modify node gpu-node-1: node name / credential "
        "mismatch" in found["error"]
    )
    assert found["failures"] >= 1 and found["next_retry"]
    table = node.gpudctl("status").stdout
    assert "node name / credential mismatch" in table
    doctor = node.gpudctl("doctor", "-o", "json")
    check = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "API link")
    assert check["ok"] is False and "credential mismatch" in check["detail"]
    # kubelet is served all the same.
    node.kubelet.wait_devices("nvidia.com/gpu", lambda d: len(d) == 2)


def test_a_missing_node_is_reported_never_created_and_a_reload_takes_new_credentials(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """The administrator's credential could create a Node; gpud's apply carries the UID it
    read, so a wrong name is "not found", never a new empty Node."""
    node = start(short_tmp, "a100-40gb:2", config(kube.admin, node_name="ghost"))
    nodes.append(node)
    found = wait_link(node, lambda p: p["state"] == "degraded")
    assert found["error"].startswith("Node ghost not found: "), found
    assert "ghost" not in kube.kubectl("get", "nodes", "-o", "name")
    # A reload with credentials that do not exist, the link required: an error, said so.
    missing = short_tmp / "missing.kubeconfig"
    (short_tmp / "gpud.yaml").write_text(
        f"version: v1\nkubernetes:\n  enabled: true\n  kubeconfig: {missing}\n"
        f"paths:\n  podResourcesSocket: {node.podres_socket}\n"
    )
    assert node.gpudctl("config", "reload").returncode == 0
    found = wait_link(node, lambda p: "does not exist" in p["error"])
    assert found["state"] == "degraded"
    assert found["error"] == (
        f"the API link is off: kubernetes.kubeconfig {missing} does not exist or is not a file"
    )


def test_a_label_someone_else_holds_with_another_value_is_a_conflict_never_forced(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """409: gpud does not take a label another manager set to another value; it says whose it
    is and what to do, keeps retrying, and applies once the other value is gone."""
    kube.kubectl("label", "node", kube.node, "nvidia.com/gpu.count=99", "--overwrite")
    try:
        node = start(short_tmp, "a100-40gb:2", config(kube.node_kubeconfig))
        nodes.append(node)
        found = wait_link(node, lambda p: p["state"] == "degraded")
        assert "held by another field manager with other values (409 Conflict)" in found["error"]
        assert "nvidia.com/gpu.count" in found["error"]
        assert f"kubectl label node {kube.node} KEY-" in found["error"]
        assert kube.labels()["nvidia.com/gpu.count"] == "99"  # not forced
        node.kubelet.wait_devices("nvidia.com/gpu", lambda d: len(d) == 2)
    finally:
        kube.kubectl("label", "node", kube.node, "nvidia.com/gpu.count-")
    kube.wait_labels(lambda got: got.get("nvidia.com/gpu.count") == "2", 90, "gpud's count")


def test_no_credentials_the_link_is_off_and_says_why(
    short_tmp: Path, nodes: list[MigNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty root for the credential search, whatever kubelet this machine runs: gpud (a child
    # process) inherits GPUD_ROOT.
    root = short_tmp / "root"
    root.mkdir()
    monkeypatch.setenv("GPUD_ROOT", str(root))
    node = start(short_tmp, "a100-40gb:2")
    nodes.append(node)
    node.kubelet.wait_devices("nvidia.com/gpu", lambda d: len(d) == 2)
    found = wait_link(node, lambda p: p["detail"].startswith("off:"))
    assert found["state"] == "ok"
    assert "no kubeconfig" in found["detail"]
    assert f"{root}/etc/kubernetes/kubelet.conf" in found["detail"]
    doctor = json.loads(node.gpudctl("doctor", "-o", "json").stdout)
    check = next(c for c in doctor["checks"] if c["name"] == "API link")
    assert check["ok"] is True and check["detail"].startswith("off: no kubeconfig")


def test_the_api_server_gone_and_back_kubelet_served_throughout_labels_converge(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    """Last in the module: it stops the shared API server and starts it again."""
    node = start(short_tmp, "a100-40gb:2", config(kube.node_kubeconfig))
    nodes.append(node)
    kube.wait_labels(lambda got: got.get("nvidia.com/gpu.count") == "2", what="gpud's labels")
    kube.down()
    try:
        assert node.mig("apply", "-c", "all-1g.5gb")[0] == 0
        node.kubelet.wait_devices(MIG_1G, lambda d: len(d) == 14)
        found = wait_link(node, lambda p: p["state"] == "degraded")
        assert "cannot reach the API server at https://127.0.0.1:" in found["error"]
    finally:
        kube.up()
    kube.wait_labels(
        lambda got: got.get("nvidia.com/mig-1g.5gb.count") == "14", timeout=40, what="catch-up"
    )
    wait_link(node, lambda p: p["state"] == "ok", timeout=10)
    assert node.kubelet.allocate(MIG_1G, [sorted(node.kubelet.devices(MIG_1G))[0]])


def test_credentials_that_appear_later_are_found_without_a_change_or_reload(
    kube: Cluster, tmp_path: Path
) -> None:
    """A node often joins the cluster after gpud is installed: the kubelet's kubeconfig shows
    up while gpud runs, and the link, off until then, comes on by itself."""
    import asyncio
    from dataclasses import replace

    from gpud.hw.sim.backend import SimBackend
    from gpud.kube.publisher import KubernetesPublisher
    from gpud.node.hub import Publishers
    from gpud.node.state import PluginStatus
    from gpud.node.stats import NodeStats
    from tests.support.snapshot import snapshot

    backend = SimBackend("a100-40gb:2", tmp_path / "sim")
    backend.open()
    state = snapshot(
        backend,
        "version: v1\nlabels:\n  static: {example.com/late: joined}\n"
        "mig:\n  byLabel: {enabled: false}\n",
    )
    registered = tuple(PluginStatus(rs.resource, "s", True) for rs in state.resources)
    state = replace(state, plugins=registered)
    kubelet_conf = tmp_path / "kubelet.conf"

    def kubelet_only(cfg: Kubernetes) -> Access:
        return resolve(cfg, candidates=(("kubeadm", kubelet_conf),))

    async def scenario() -> None:
        hub = Publishers(state, requests=None, stats=NodeStats())  # type: ignore[arg-type]
        hub.add(KubernetesPublisher(resolve=kubelet_only, recheck_s=0.2))
        await hub.start()
        try:
            await asyncio.sleep(0.5)
            (status,) = hub.statuses()
            assert status.state == "ok" and status.detail.startswith("off: no kubeconfig")
            kubelet_conf.write_text(kube.node_kubeconfig.read_text())
            deadline = time.monotonic() + 15
            while "labels applied" not in hub.statuses()[0].detail:
                assert time.monotonic() < deadline, hub.statuses()
                await asyncio.sleep(0.1)
        finally:
            await hub.stop()

    asyncio.run(scenario())
    assert kube.labels()["example.com/late"] == "joined"
