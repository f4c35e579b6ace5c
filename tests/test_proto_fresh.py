"""The committed stubs in gpud/_proto must be what grpcio-tools makes from proto/ today.

A field renumbered in proto/ but not regenerated would put gpud off kubelet's wire contract
while every other test still passed against the stale stubs.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen-proto"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "gpud/_proto").rglob("*.py*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "gpud/_proto").rglob("*.py*"))
    assert fresh == committed
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert stale == [], "run scripts/gen-proto and commit the result"


def test_wire_contract_field_numbers() -> None:
    """Spot-check the numbers kubelet depends on (shared/reference/nvidia-anchors.md 4.2)."""
    from gpud._proto.deviceplugin.v1beta1 import api_pb2

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(api_pb2.RegisterRequest) == {
        "version": 1,
        "endpoint": 2,
        "resource_name": 3,
        "options": 4,
    }
    assert numbers(api_pb2.Device) == {"ID": 1, "health": 2, "topology": 3}
    assert numbers(api_pb2.ContainerAllocateResponse) == {
        "envs": 1,
        "mounts": 2,
        "devices": 3,
        "annotations": 4,
        "cdi_devices": 5,
    }
    assert numbers(api_pb2.ContainerPreferredAllocationRequest) == {
        "available_deviceIDs": 1,
        "must_include_deviceIDs": 2,
        "allocation_size": 3,
    }
    services = api_pb2.DESCRIPTOR.services_by_name
    assert [m.full_name for m in services["DevicePlugin"].methods] == [
        "v1beta1.DevicePlugin.GetDevicePluginOptions",
        "v1beta1.DevicePlugin.ListAndWatch",
        "v1beta1.DevicePlugin.GetPreferredAllocation",
        "v1beta1.DevicePlugin.Allocate",
        "v1beta1.DevicePlugin.PreStartContainer",
    ]
    assert services["Registration"].methods[0].full_name == "v1beta1.Registration.Register"


def test_dra_wire_contract() -> None:
    """Registration, DRA v1/v1beta1 and health v1alpha1 as kubelet 1.34-1.36 speaks them
    (shared/reference/dra.md 1.2 and 2): a wrong package makes every call Unimplemented."""
    from gpud._proto.dra.v1 import api_pb2 as v1
    from gpud._proto.dra.v1beta1 import api_pb2 as v1beta1
    from gpud._proto.drahealth.v1alpha1 import api_pb2 as health
    from gpud._proto.pluginregistration.v1 import api_pb2 as reg

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    def methods(module: object, service: str) -> list[str]:
        desc = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
        return [f"/{desc.full_name}/{m.name}" for m in desc.methods]

    assert methods(reg, "Registration") == [
        "/pluginregistration.Registration/GetInfo",
        "/pluginregistration.Registration/NotifyRegistrationStatus",
    ]
    assert numbers(reg.PluginInfo) == {
        "type": 1,
        "name": 2,
        "endpoint": 3,
        "supported_versions": 4,
    }
    assert numbers(reg.RegistrationStatus) == {"plugin_registered": 1, "error": 2}
    for api, version in ((v1, "v1"), (v1beta1, "v1beta1")):
        assert methods(api, "DRAPlugin") == [
            f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodePrepareResources",
            f"/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodeUnprepareResources",
        ]
        assert numbers(api.Claim) == {"namespace": 1, "uid": 2, "name": 3}
        assert numbers(api.NodePrepareResourceResponse) == {"devices": 1, "error": 2}
        assert numbers(api.NodeUnprepareResourceResponse) == {"error": 1}
        assert numbers(api.NodePrepareResourcesResponse) == {"claims": 1}
    device = {"request_names": 1, "pool_name": 2, "device_name": 3, "cdi_device_ids": 4}
    assert numbers(v1beta1.Device) == device
    assert numbers(v1.Device) == {**device, "share_id": 5}
    assert methods(health, "DRAResourceHealth") == [
        "/v1alpha1.DRAResourceHealth/NodeWatchResources"
    ]
    assert numbers(health.DeviceHealth) == {
        "device": 1,
        "health": 2,
        "last_updated_time": 3,
        "health_check_timeout_seconds": 4,
        "message": 5,
    }
    assert numbers(health.DeviceIdentifier) == {"pool_name": 1, "device_name": 2}
    assert dict(health.HealthStatus.items()) == {"UNKNOWN": 0, "HEALTHY": 1, "UNHEALTHY": 2}
