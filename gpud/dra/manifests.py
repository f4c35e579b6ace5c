"""The DeviceClasses a cluster administrator applies for nodes that run gpud in DRA mode.

A kubelet credential cannot create DeviceClasses (cluster-scoped, admin-owned), so gpud prints
them (``gpudctl dra manifests | kubectl apply -f -``). They are NVIDIA's, with NVIDIA's names and
CEL selectors (shared/reference/dra.md §4.2), so a cluster that already has NVIDIA's chart's
classes needs nothing new and claims written for them select gpud's devices. As in NVIDIA's chart
for ``resource.k8s.io/v1``, the GPU class carries ``extendedResourceName: nvidia.com/gpu``: a pod
that asks for ``nvidia.com/gpu`` is served through DRA on nodes whose GPUs are published as
ResourceSlices, and through the device plugin on nodes that still run it (KEP-5004: one node
never backs one name both ways).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from gpud.config.models import Dra

EXTENDED_RESOURCE = "nvidia.com/gpu"


def class_names(driver: str) -> tuple[str, str]:
    """The GPU and MIG class names: ``gpu.nvidia.com`` and ``mig.nvidia.com`` for NVIDIA's
    driver name; for another, the driver name and ``mig.`` before what follows ``gpu.``."""
    return driver, "mig." + driver.removeprefix("gpu.")


def _selector(driver: str, kind: str) -> str:
    return f"device.driver == '{driver}' && device.attributes['{driver}'].type == '{kind}'"


def device_classes(driver: str) -> list[dict[str, Any]]:
    gpu, mig = class_names(driver)
    labels = {"app.kubernetes.io/managed-by": "gpud"}
    out = []
    for name, kind in ((gpu, "gpu"), (mig, "mig")):
        spec: dict[str, Any] = {"selectors": [{"cel": {"expression": _selector(driver, kind)}}]}
        if kind == "gpu":
            spec["extendedResourceName"] = EXTENDED_RESOURCE
        out.append(
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": name, "labels": dict(labels)},
                "spec": spec,
            }
        )
    return out


def manifests_yaml(driver: str) -> str:
    """The classes as one YAML stream for ``kubectl apply -f -``; ValueError for a name that
    is not a DRA driver name (the rule ``dra.driverName`` has)."""
    try:
        Dra(driver_name=driver)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    head = (
        f"# DeviceClasses for gpud's DRA devices (driver {driver}); apply with\n"
        "#   gpudctl dra manifests | kubectl apply -f -\n"
    )
    docs = [yaml.safe_dump(c, sort_keys=False, width=1000) for c in device_classes(driver)]
    return head + "---\n" + "---\n".join(docs)
