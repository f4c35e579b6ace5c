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
