"""An API server that throttles gpud (429 Too Many Requests), for real: kube-apiserver with its
EventRateLimit admission plugin allowing one Event a second to the whole server, as a busy
cluster's control plane may. gpud says it is throttled, backs off, and every Event still arrives,
once.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kubekit import Cluster, cluster
from tests.support.mignode import MigNode, start, stopped_after
from tests.test_kube_link import config, link

ADMISSION = """\
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: EventRateLimit
  configuration:
    apiVersion: eventratelimit.admission.k8s.io/v1alpha1
    kind: Configuration
    limits:
    - type: Server
      qps: 1
      burst: 1
"""


@pytest.fixture(scope="module")
def kube() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="gpud-kube-429-"))
    admission = root / "admission.yaml"
    admission.write_text(ADMISSION)
    found = cluster(
        root,
        "--enable-admission-plugins=NodeRestriction,EventRateLimit "
        f"--admission-control-config-file={admission}",
    )
    try:
        yield found
    finally:
        found.down()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def nodes() -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def test_events_the_api_server_throttles_are_retried_and_arrive_once_each(
    kube: Cluster, short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a100-40gb:4", config(kube.node_kubeconfig))
    nodes.append(node)
    kube.wait_labels(lambda got: got.get("nvidia.com/gpu.count") == "4", what="gpud's labels")
    for gpu in range(4):  # four Events at once; the server takes one a second
        assert node.gpudctl("debug", "inject-xid", "--gpu", str(gpu), "--xid", "79").returncode == 0
    log = node.gpud.wait_log("429 Too Many Requests")
    assert "is throttling gpud (429 Too Many Requests); retrying with backoff" in log
    found = kube.wait_events(
        lambda e: sum(x["reason"] == "GPUXidError" for x in e) >= 4, 60, "4 XID Events"
    )
    time.sleep(2)  # nothing more comes: a throttled try that was refused is not counted twice
    xids = [e for e in kube.events() if e["reason"] == "GPUXidError"]
    assert len(xids) == 4, [e["message"][:60] for e in found]
    assert sorted(e["message"].split(" (")[0] for e in xids) == [
        f"XID 79 on GPU {gpu}" for gpu in range(4)
    ]
    assert all(e.get("count", 1) == 1 for e in xids)
    detail = link(node)["detail"]
    assert "Events: 4 sent" in detail, detail
