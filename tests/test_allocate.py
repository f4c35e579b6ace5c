"""Allocate responses: device-list strategies, ID strategies, replicas and refused requests."""

from __future__ import annotations

import pytest

from gpud.config.models import DevicePlugin
from gpud.resources.allocate import (
    CONTROL_DEVICE_PATHS,
    AllocationError,
    ContainerAllocation,
    DeviceSpec,
    container_allocation,
)
from gpud.resources.types import Device, ResourceSet


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-{i:012x}"


def gpu_device(i: int, healthy: bool = True) -> Device:
    return Device(
        id=uuid(i),
        healthy=healthy,
        numa_node=i // 2,
        gpu_uuid=uuid(i),
        visible_uuid=uuid(i),
        index=str(i),
        device_paths=(f"/dev/nvidia{i}",),
    )


def replica(i: int, r: int) -> Device:
    return Device(
        id=f"{uuid(i)}::{r}",
        healthy=True,
        numa_node=i // 2,
        gpu_uuid=uuid(i),
        visible_uuid=uuid(i),
        index=str(i),
        device_paths=(f"/dev/nvidia{i}",),
        replica=r,
    )


MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000000"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-000000000000"


def mig(visible: str, gpu: int, slot: int, gi: int) -> Device:
    return Device(
        id=visible,
        healthy=True,
        numa_node=0,
        gpu_uuid=uuid(gpu),
        visible_uuid=visible,
        index=f"{gpu}:{slot}",
        device_paths=(
            f"/dev/nvidia{gpu}",
            f"/dev/nvidia-caps/nvidia-cap{gi}",
            f"/dev/nvidia-caps/nvidia-cap{gi + 1}",
        ),
    )


GPUS = ResourceSet("nvidia.com/gpu", tuple(gpu_device(i, healthy=i != 3) for i in range(4)))
SHARED = ResourceSet("nvidia.com/gpu", tuple(replica(i, r) for i in range(2) for r in range(3)))
STRICT_SHARED = ResourceSet("nvidia.com/gpu", SHARED.devices, fail_requests_greater_than_one=True)
MIG = ResourceSet("nvidia.com/mig-1g.10gb", (mig(MIG_A, 0, 1, 21), mig(MIG_B, 0, 2, 30)))


def cfg(*strategies: str, **kwargs: object) -> DevicePlugin:
    return DevicePlugin(device_list_strategy=list(strategies or ["envvar"]), **kwargs)


def test_default_is_envvar_with_uuids() -> None:
    got = container_allocation(GPUS, [uuid(2), uuid(0)], DevicePlugin())
    assert got == ContainerAllocation(
        envs={"NVIDIA_VISIBLE_DEVICES": f"{uuid(2)},{uuid(0)}"},
        annotations={},
        cdi_devices=(),
        device_specs=(),
    )


def test_envvar_with_index_strategy() -> None:
    got = container_allocation(GPUS, [uuid(2), uuid(0)], cfg("envvar", device_id_strategy="index"))
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": "2,0"}


def test_cdi_annotations_only_sets_no_env() -> None:
    got = container_allocation(GPUS, [uuid(0), uuid(1)], cfg("cdi-annotations"))
    assert got == ContainerAllocation(
        envs={},
        annotations={"cdi.k8s.io/gpud_gpu": f"nvidia.com/gpu={uuid(0)},nvidia.com/gpu={uuid(1)}"},
        cdi_devices=(),
        device_specs=(),
    )


def test_cdi_cri_only_sets_no_env() -> None:
    got = container_allocation(GPUS, [uuid(1)], cfg("cdi-cri"))
    assert got == ContainerAllocation(
        envs={}, annotations={}, cdi_devices=(f"nvidia.com/gpu={uuid(1)}",), device_specs=()
    )


def test_all_strategies_combined() -> None:
    got = container_allocation(
        GPUS, [uuid(1), uuid(0)], cfg("envvar", "cdi-annotations", "cdi-cri")
    )
    names = (f"nvidia.com/gpu={uuid(1)}", f"nvidia.com/gpu={uuid(0)}")
    assert got == ContainerAllocation(
        envs={"NVIDIA_VISIBLE_DEVICES": f"{uuid(1)},{uuid(0)}"},
        annotations={"cdi.k8s.io/gpud_gpu": ",".join(names)},
        cdi_devices=names,
        device_specs=(),
    )


def test_envvar_and_cdi_cri() -> None:
    got = container_allocation(GPUS, [uuid(0)], cfg("envvar", "cdi-cri"))
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": uuid(0)}
    assert got.annotations == {}
    assert got.cdi_devices == (f"nvidia.com/gpu={uuid(0)}",)


def test_cdi_names_follow_index_strategy_prefix_and_kind() -> None:
    config = cfg(
        "cdi-annotations",
        "cdi-cri",
        device_id_strategy="index",
        cdi_annotation_prefix="example.io/",
        cdi_kind="example.com/accel",
    )
    got = container_allocation(GPUS, [uuid(0), uuid(2)], config)
    assert got.annotations == {"example.io/gpud_gpu": "example.com/accel=0,example.com/accel=2"}
    assert got.cdi_devices == ("example.com/accel=0", "example.com/accel=2")
    assert got.envs == {}


def test_mig_devices_use_mig_uuids_and_gpu_colon_mig_indices() -> None:
    by_uuid = container_allocation(MIG, [MIG_B], cfg("envvar", "cdi-annotations"))
    assert by_uuid.envs == {"NVIDIA_VISIBLE_DEVICES": MIG_B}
    assert by_uuid.annotations == {"cdi.k8s.io/gpud_mig-1g.10gb": f"nvidia.com/gpu={MIG_B}"}
    by_index = container_allocation(MIG, [MIG_B], cfg("cdi-cri", device_id_strategy="index"))
    assert by_index.cdi_devices == ("nvidia.com/gpu=0:2",)


def test_replicas_map_back_to_their_gpu_once() -> None:
    request = [f"{uuid(1)}::2", f"{uuid(0)}::0", f"{uuid(1)}::0"]
    got = container_allocation(SHARED, request, cfg("envvar", "cdi-cri"))
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": f"{uuid(1)},{uuid(0)}"}
    assert got.cdi_devices == (f"nvidia.com/gpu={uuid(1)}", f"nvidia.com/gpu={uuid(0)}")


def test_replicas_with_index_strategy_dedupe_too() -> None:
    request = [f"{uuid(1)}::0", f"{uuid(1)}::1"]
    got = container_allocation(SHARED, request, cfg("envvar", device_id_strategy="index"))
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": "1"}


def test_fail_requests_greater_than_one_refuses_two_replicas() -> None:
    request = [f"{uuid(0)}::0", f"{uuid(1)}::0"]
    with pytest.raises(AllocationError) as err:
        container_allocation(STRICT_SHARED, request, DevicePlugin())
    assert str(err.value) == (
        "maximum request size for shared resources is 1 (failRequestsGreaterThanOne); "
        f"nvidia.com/gpu request has 2: {uuid(0)}::0, {uuid(1)}::0"
    )
    assert err.value.ids == tuple(request)


def test_fail_requests_greater_than_one_allows_one_replica() -> None:
    got = container_allocation(STRICT_SHARED, [f"{uuid(1)}::2"], DevicePlugin())
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": uuid(1)}


def test_without_fail_requests_greater_than_one_two_replicas_are_fine() -> None:
    got = container_allocation(SHARED, [f"{uuid(0)}::0", f"{uuid(1)}::0"], DevicePlugin())
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": f"{uuid(0)},{uuid(1)}"}


def test_fail_requests_greater_than_one_ignores_whole_gpus() -> None:
    strict = ResourceSet(GPUS.resource, GPUS.devices, fail_requests_greater_than_one=True)
    got = container_allocation(strict, [uuid(0), uuid(1)], DevicePlugin())
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": f"{uuid(0)},{uuid(1)}"}


def test_unknown_ids_are_refused_by_name() -> None:
    with pytest.raises(AllocationError) as err:
        container_allocation(GPUS, [uuid(0), "GPU-gone", "GPU-lost"], DevicePlugin())
    assert str(err.value) == "unknown device IDs for nvidia.com/gpu: GPU-gone, GPU-lost"
    assert err.value.ids == ("GPU-gone", "GPU-lost")


def test_unknown_replica_is_refused() -> None:
    with pytest.raises(AllocationError) as err:
        container_allocation(SHARED, [f"{uuid(0)}::9"], DevicePlugin())
    assert str(err.value) == f"unknown device IDs for nvidia.com/gpu: {uuid(0)}::9"


def test_unhealthy_device_is_refused_with_its_index() -> None:
    with pytest.raises(AllocationError) as err:
        container_allocation(GPUS, [uuid(0), uuid(3)], DevicePlugin())
    assert str(err.value) == f"unhealthy device for nvidia.com/gpu: {uuid(3)} (GPU 3)"
    assert err.value.ids == (uuid(3),)


def test_several_unhealthy_devices_are_all_named() -> None:
    rs = ResourceSet("nvidia.com/gpu", (gpu_device(0, False), gpu_device(1, False)))
    with pytest.raises(AllocationError) as err:
        container_allocation(rs, [uuid(0), uuid(1)], DevicePlugin())
    assert str(err.value) == (
        f"unhealthy devices for nvidia.com/gpu: {uuid(0)} (GPU 0), {uuid(1)} (GPU 1)"
    )


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(AllocationError) as err:
        container_allocation(GPUS, [uuid(0), uuid(1), uuid(0)], DevicePlugin())
    assert str(err.value) == f"device IDs requested more than once for nvidia.com/gpu: {uuid(0)}"
    assert err.value.ids == (uuid(0),)


def test_empty_request_is_refused() -> None:
    with pytest.raises(AllocationError) as err:
        container_allocation(GPUS, [], DevicePlugin())
    assert str(err.value) == "empty device request for nvidia.com/gpu"
    assert err.value.ids == ()


def test_pass_device_specs_lists_control_nodes_then_device_nodes() -> None:
    got = container_allocation(
        GPUS,
        [uuid(2), uuid(0)],
        cfg("envvar", pass_device_specs=True),
        control_devices=("/dev/nvidiactl", "/dev/nvidia-uvm"),
    )
    assert got.device_specs == (
        DeviceSpec("/dev/nvidiactl", "/dev/nvidiactl", "rw"),
        DeviceSpec("/dev/nvidia-uvm", "/dev/nvidia-uvm", "rw"),
        DeviceSpec("/dev/nvidia2", "/dev/nvidia2", "rw"),
        DeviceSpec("/dev/nvidia0", "/dev/nvidia0", "rw"),
    )


def test_pass_device_specs_dedupes_shared_nodes() -> None:
    got = container_allocation(
        MIG, [MIG_A, MIG_B], cfg("envvar", pass_device_specs=True), ("/dev/nvidiactl",)
    )
    assert [s.host_path for s in got.device_specs] == [
        "/dev/nvidiactl",
        "/dev/nvidia0",
        "/dev/nvidia-caps/nvidia-cap21",
        "/dev/nvidia-caps/nvidia-cap22",
        "/dev/nvidia-caps/nvidia-cap30",
        "/dev/nvidia-caps/nvidia-cap31",
    ]
    replicas = container_allocation(
        SHARED, [f"{uuid(0)}::0", f"{uuid(0)}::1"], cfg("envvar", pass_device_specs=True)
    )
    assert replicas.device_specs == (DeviceSpec("/dev/nvidia0", "/dev/nvidia0", "rw"),)


def test_no_device_specs_unless_asked() -> None:
    got = container_allocation(GPUS, [uuid(0)], DevicePlugin(), CONTROL_DEVICE_PATHS)
    assert got.device_specs == ()


def test_control_device_paths() -> None:
    assert CONTROL_DEVICE_PATHS == (
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidia-modeset",
    )


def mig_replica(visible: str, gpu: int, slot: int, gi: int, r: int) -> Device:
    base = mig(visible, gpu, slot, gi)
    return Device(
        id=f"{visible}::{r}",
        healthy=True,
        numa_node=base.numa_node,
        gpu_uuid=base.gpu_uuid,
        visible_uuid=visible,
        index=base.index,
        device_paths=base.device_paths,
        replica=r,
    )


SHARED_MIG = ResourceSet(
    "nvidia.com/mig-1g.10gb",
    tuple(
        mig_replica(v, 0, s, gi, r) for v, s, gi in ((MIG_A, 1, 21), (MIG_B, 2, 30)) for r in (0, 1)
    ),
)


def test_mig_replicas_map_back_to_the_mig_uuid_with_its_cap_nodes() -> None:
    request = [f"{MIG_B}::1", f"{MIG_A}::0", f"{MIG_B}::0"]
    got = container_allocation(
        SHARED_MIG, request, cfg("envvar", "cdi-cri", pass_device_specs=True), ("/dev/nvidiactl",)
    )
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": f"{MIG_B},{MIG_A}"}
    assert got.cdi_devices == (f"nvidia.com/gpu={MIG_B}", f"nvidia.com/gpu={MIG_A}")
    assert [s.host_path for s in got.device_specs] == [
        "/dev/nvidiactl",
        "/dev/nvidia0",
        "/dev/nvidia-caps/nvidia-cap30",
        "/dev/nvidia-caps/nvidia-cap31",
        "/dev/nvidia-caps/nvidia-cap21",
        "/dev/nvidia-caps/nvidia-cap22",
    ]
    by_index = container_allocation(
        SHARED_MIG, [f"{MIG_A}::1", f"{MIG_A}::0"], cfg("envvar", device_id_strategy="index")
    )
    assert by_index.envs == {"NVIDIA_VISIBLE_DEVICES": "0:1"}
