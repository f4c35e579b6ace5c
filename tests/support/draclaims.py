"""DRA objects for tests and benchmarks against kubekit: a node's ResourceSlice, a DeviceClass,
and a pod whose ResourceClaimTemplate the real scheduler allocates."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tests.support.drakubelet import Claim
from tests.support.kubekit import Cluster


def node_slice(node: str, driver: str, devices: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{driver}"},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": d, "attributes": {"type": {"string": "gpu"}}} for d in devices],
        },
    }


def device_class(driver: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": driver},
        "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{driver}'"}}]},
    }


def claimed_pod(kube: Cluster, device_class: str, node: str = "gpu-node-1") -> Claim:
    """A pod with a one-device ResourceClaimTemplate of ``device_class``, scheduled to
    ``node``; its claim once the scheduler allocated it."""
    name = f"p{uuid.uuid4().hex[:8]}"
    template = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": device_class}}
        ]}}},
    }  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [node]}
                ]}]
            }}},
            "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": name}],
            "containers": [
                {"name": "c", "image": "cuda", "resources": {"claims": [{"name": "gpu"}]}}
            ],
        },
    }  # fmt: skip
    kube.kubectl("create", "-f", "-", stdin=json.dumps({"kind": "List", "apiVersion": "v1",
                                                        "items": [template, pod]}))  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        got = json.loads(kube.kubectl("get", "pod", name, "-o", "json"))
        statuses = (got.get("status") or {}).get("resourceClaimStatuses") or []
        if got["spec"].get("nodeName") and statuses:
            claim_name = statuses[0]["resourceClaimName"]
            claim = json.loads(kube.kubectl("get", "resourceclaim", claim_name, "-o", "json"))
            if (claim.get("status") or {}).get("allocation"):
                return Claim("default", claim_name, claim["metadata"]["uid"])
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {name} not scheduled with an allocated claim: {got}")
        time.sleep(0.2)


def allocated_device(kube: Cluster, claim: Claim) -> str:
    got = json.loads(kube.kubectl("get", "resourceclaim", claim.name, "-o", "json"))
    (result,) = got["status"]["allocation"]["devices"]["results"]
    return str(result["device"])
