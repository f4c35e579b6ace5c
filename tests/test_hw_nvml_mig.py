"""MIG in the NVML backend, tested below pynvml against the fake library's MIG rules.

The fake takes its profile tables from the catalog but keeps NVML's two ID spaces apart (profile
info is looked up by enum and answers the device profile ID), so a backend that mixed them up would
read A30 profiles wrongly even where A100 numbers happen to line up.
"""

from __future__ import annotations

import ctypes
import queue
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pynvml
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.hw.backend import MigBackend
from gpud.hw.errors import ErrorKind, HwError
from gpud.hw.nvml import NvmlBackend, run_command
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    ComputeInstance,
    EventKind,
    GpuInstance,
    GpuProcess,
    HwEvent,
    MigMode,
    MigState,
    Placement,
)
from gpud.mig.catalog import Family, family_for
from tests.fakenvml import (
    CI_PROFILE_INFO_V2,
    GI_PROFILE_COUNT,
    GI_PROFILE_INFO_V2,
    NO_INSTANCE,
    FakeGpu,
    FakeNvml,
    ProcessInfo,
    Ret,
    installed,
    t4,
)
from tests.support.migref import described, reference

A100_40GB = 0x20B010DE
A30 = 0x20B710DE
H100_SXM = 0x233010DE
BUS_ID = "00000000:07:00.0"
GPU_UUID = "GPU-5e0c2a4f-0b7d-4c1e-9a3f-6d2b8e1f4c70"
MIG_UUID = re.compile(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

BOARDS = {
    A100_40GB: ("NVIDIA A100-SXM4-40GB", 40960),
    A30: ("NVIDIA A30", 24576),
    H100_SXM: ("NVIDIA H100 80GB HBM3", 81559),
}
ENABLED = MigState(MigMode.ENABLED, MigMode.ENABLED)
DISABLED = MigState(MigMode.DISABLED, MigMode.DISABLED)


def board(pci_device_id: int = A100_40GB, mig: tuple[int, int] | None = (1, 1)) -> FakeGpu:
    name, memory = BOARDS.get(pci_device_id, ("NVIDIA Unknown", 16384))
    return FakeGpu(
        uuid=GPU_UUID,
        name=name,
        bus_id=BUS_ID,
        pci_device_id=pci_device_id,
        memory_mib=memory,
        mig=mig,
    )


def family(pci_device_id: int) -> Family:
    fam = family_for(pci_device_id)
    assert fam is not None
    return fam


@dataclass
class Recorder:
    """Stands in for the command runner: records the reset command and what NVML looked like
    while it ran, and resets the fake board the way nvidia-smi would."""

    fake: FakeNvml
    returncode: int = 0
    stderr: str = ""
    raises: BaseException | None = None
    calls: list[tuple[list[str], float]] = field(default_factory=list)
    nvml_refs_during: list[int] = field(default_factory=list)

    def __call__(self, argv, timeout):
        self.calls.append((list(argv), timeout))
        self.nvml_refs_during.append(self.fake.init_count)
        if self.raises is not None:
            raise self.raises
        if self.returncode == 0:
            assert self.fake.reset_gpu(self.fake.index_of_bus_id(argv[-1])) == Ret.SUCCESS
        return subprocess.CompletedProcess(list(argv), self.returncode, "", self.stderr)


class NvmlBackendOpen:
    """An open backend for tests that install the fake themselves."""

    def __enter__(self) -> NvmlBackend:
        self.backend = NvmlBackend()
        self.backend.open()
        return self.backend

    def __exit__(self, *exc) -> None:
        self.backend.close()


@pytest.fixture
def mig(fake_nvml) -> Iterator:
    """``fake, backend = mig(board(...))``: one fake GPU and an open backend over it."""
    opened: list[NvmlBackend] = []

    def make(*gpus: FakeGpu, root: bool = True, **kwargs) -> tuple[FakeNvml, NvmlBackend]:
        fake = fake_nvml(FakeNvml(list(gpus), root=root))
        if "command_runner" not in kwargs:
            kwargs["command_runner"] = Recorder(fake)
        backend = NvmlBackend(**kwargs)
        backend.open()
        opened.append(backend)
        return fake, backend

    yield make
    for backend in opened:
        backend.close()


def build_3_2_1_1(backend: NvmlBackend) -> list[tuple[GpuInstance, ComputeInstance]]:
    """UG's "3-2-1-1" A100 layout, each GI with its full-size CI."""
    made = []
    for profile_id, placement, ci_profile_id in [
        (9, Placement(4, 4), 2),
        (14, Placement(2, 2), 1),
        (19, Placement(0, 1), 0),
        (19, Placement(1, 1), 0),
    ]:
        gi = backend.create_gpu_instance(0, profile_id, placement)
        ci = backend.create_compute_instance(0, gi.gi_id, ci_profile_id)
        made.append((gi, ci))
    return made


def mig_devices_by_nvml() -> dict[tuple[int, int], str]:
    """(GI, CI) -> UUID of every MIG device, asked of (fake) NVML directly."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    found = {}
    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            device = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError_NotFound:
            continue
        assert pynvml.nvmlDeviceIsMigDeviceHandle(device).value == 1
        key = (
            pynvml.nvmlDeviceGetGpuInstanceId(device),
            pynvml.nvmlDeviceGetComputeInstanceId(device),
        )
        found[key] = pynvml.nvmlDeviceGetUUID(device)
    return found


# ---- reading profiles ---------------------------------------------------------------------------


def test_is_a_mig_backend():
    assert isinstance(NvmlBackend(), MigBackend)


def test_a100_profiles_match_the_reference(mig):
    fake, backend = mig(board(A100_40GB))
    state = backend.mig_state(0)
    assert (state.index, state.uuid, state.pci_device_id) == (0, GPU_UUID, A100_40GB)
    assert state.mode == ENABLED
    assert [p.profile_id for p in state.profiles] == [19, 20, 15, 14, 9, 5, 0]
    assert described(state.profiles, "A100-40GB") == reference("A100-40GB")
    by_name = {p.name: p for p in state.profiles}
    assert by_name["1g.5gb"].placements == tuple(Placement(s, 1) for s in range(7))
    assert by_name["1g.10gb"].placements == (
        Placement(0, 2),
        Placement(2, 2),
        Placement(4, 2),
        Placement(6, 2),
    )
    assert by_name["3g.20gb"].placements == (Placement(0, 4), Placement(4, 4))
    assert by_name["3g.20gb"].memory_slices == 4
    assert by_name["7g.40gb"].placements == (Placement(0, 8),)
    assert by_name["1g.5gb+me"].max_count == 1
    assert state.instances == ()
    assert fake.mutations() == 0


def test_a30_profile_ids_are_not_the_enums(mig):
    _, backend = mig(board(A30))
    state = backend.mig_state(0)
    assert [(p.profile_id, p.name) for p in state.profiles] == [
        (14, "1g.6gb"),
        (21, "1g.6gb+me"),
        (5, "2g.12gb"),
        (6, "2g.12gb+me"),
        (0, "4g.24gb"),
    ]
    assert described(state.profiles, "A30-24GB") == reference("A30-24GB")
    # Profile ID 0 is the 4-slice profile here, while enum 0 is the 1-slice one: the placements
    # and the created GI show which space each call used.
    assert state.profiles[0].placements == tuple(Placement(s, 1) for s in range(4))
    gi = backend.create_gpu_instance(0, 0, Placement(0, 4))
    assert gi.profile_id == 0
    assert backend.mig_state(0).instances == (GpuInstance(gi.gi_id, 0, Placement(0, 4)),)


def test_profiles_are_enumerated_until_invalid_argument(mig):
    fake, backend = mig(board(A100_40GB))
    backend.mig_state(0)
    # enums 0 .. COUNT-1 (NOT_SUPPORTED for the ones A100 lacks), then INVALID_ARGUMENT at COUNT.
    assert fake.calls["nvmlDeviceGetGpuInstanceProfileInfoV"] == GI_PROFILE_COUNT + 1


@pytest.mark.parametrize("modes", [(0, 0), (0, 1)])
def test_mig_off_falls_back_to_the_catalog(mig, modes):
    fake, backend = mig(board(A100_40GB, mig=modes))
    state = backend.mig_state(0)
    assert state.mode == MigState(MigMode.DISABLED, MigMode(("disabled", "enabled")[modes[1]]))
    assert described(state.profiles, "A100-40GB") == reference("A100-40GB")
    assert state.instances == ()
    # NVML was asked (and said NOT_SUPPORTED); nothing that needs MIG on was.
    assert fake.calls["nvmlDeviceGetGpuInstanceProfileInfoV"] == GI_PROFILE_COUNT + 1
    assert fake.calls["nvmlDeviceGetGpuInstances"] == 0


def test_mig_off_on_a_board_the_catalog_lacks_has_no_profiles(mig):
    _, backend = mig(board(0x12345678, mig=(0, 0)))
    state = backend.mig_state(0)
    assert state.mode == DISABLED and state.mode.capable
    assert state.profiles == () and state.instances == ()


def test_a_board_without_mig(fake_nvml):
    fake_nvml(t4())
    backend = NvmlBackend()
    backend.open()
    try:
        state = backend.mig_state(0)
    finally:
        backend.close()
    assert state.mode == MIG_UNSUPPORTED
    assert state.profiles == () and state.instances == ()


def test_ci_profiles_come_from_nvml_once_a_gi_exists(mig):
    fake, backend = mig(board(A100_40GB))
    backend.mig_state(0)
    assert fake.calls["nvmlGpuInstanceGetComputeInstanceProfileInfoV"] == 0
    backend.create_gpu_instance(0, 9, Placement(0, 4))
    state = backend.mig_state(0)
    assert fake.calls["nvmlGpuInstanceGetComputeInstanceProfileInfoV"] > 0
    three_g = next(p for p in state.profiles if p.profile_id == 9)
    assert [(c.profile_id, c.slices, c.max_count, c.name) for c in three_g.compute_profiles] == [
        (0, 1, 3, "1c.3g.20gb"),
        (1, 2, 1, "2c.3g.20gb"),
        (2, 3, 1, "3g.20gb"),
    ]
    assert described(state.profiles, "A100-40GB") == reference("A100-40GB")


# ---- creating and reading instances -------------------------------------------------------------


def test_build_3_2_1_1_and_read_it_back(mig):
    fake, backend = mig(board(A100_40GB))
    made = build_3_2_1_1(backend)
    assert fake.mutations() == 8
    state = backend.mig_state(0)
    assert fake.mutations() == 8  # reading changes nothing

    by_placement = {gi.placement: gi for gi in state.instances}
    assert sorted(by_placement) == [
        Placement(0, 1),
        Placement(1, 1),
        Placement(2, 2),
        Placement(4, 4),
    ]
    assert [gi.gi_id for gi in state.instances] == sorted(gi.gi_id for gi in state.instances)
    for created_gi, created_ci in made:
        read = by_placement[created_gi.placement]
        assert read.gi_id == created_gi.gi_id
        assert read.profile_id == created_gi.profile_id
        assert read.compute_instances == (created_ci,)
        assert created_ci.start == 0
        assert MIG_UUID.fullmatch(created_ci.mig_uuid)
    assert {gi.profile_id: gi.compute_instances[0].slices for gi in state.instances} == {
        9: 3,
        14: 2,
        19: 1,
    }
    # The UUIDs mig_state reports are those NVML gives for the MIG device handles.
    assert mig_devices_by_nvml() == {
        (gi.gi_id, ci.ci_id): ci.mig_uuid for gi in state.instances for ci in gi.compute_instances
    }
    assert len({ci.mig_uuid for _, ci in made}) == 4


def test_gi_ids_are_the_drivers_not_the_placement(mig):
    _, backend = mig(board(A100_40GB))
    first = backend.create_gpu_instance(0, 19, Placement(6, 1))
    second = backend.create_gpu_instance(0, 19, Placement(0, 1))
    assert (first.gi_id, second.gi_id) == (1, 2)
    assert [gi.placement for gi in backend.mig_state(0).instances] == [
        Placement(6, 1),
        Placement(0, 1),
    ]


def test_partial_compute_instances_share_their_gi(mig):
    _, backend = mig(board(A100_40GB))
    gi = backend.create_gpu_instance(0, 9, Placement(0, 4))
    cis = [backend.create_compute_instance(0, gi.gi_id, 0) for _ in range(3)]
    assert [(c.ci_id, c.start, c.slices) for c in cis] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    with pytest.raises(HwError) as info:
        backend.create_compute_instance(0, gi.gi_id, 0)
    assert info.value.kind is ErrorKind.INSUFFICIENT_RESOURCES
    assert backend.mig_state(0).instances[0].compute_instances == tuple(cis)


def test_empty_mig_device_slots_are_skipped(mig):
    _, backend = mig(board(A100_40GB))
    made = build_3_2_1_1(backend)
    gi, ci = made[1]
    backend.destroy_compute_instance(0, gi.gi_id, ci.ci_id)
    state = backend.mig_state(0)
    assert len(mig_devices_by_nvml()) == 3
    assert {g.gi_id: len(g.compute_instances) for g in state.instances}[gi.gi_id] == 0
    again = backend.create_compute_instance(0, gi.gi_id, 1)
    assert again.mig_uuid != ci.mig_uuid
    assert mig_devices_by_nvml()[(gi.gi_id, again.ci_id)] == again.mig_uuid


def test_destroy_in_order_leaves_nothing(mig):
    fake, backend = mig(board(A100_40GB))
    for gi, ci in build_3_2_1_1(backend):
        backend.destroy_compute_instance(0, gi.gi_id, ci.ci_id)
        backend.destroy_gpu_instance(0, gi.gi_id)
    assert backend.mig_state(0).instances == ()
    assert fake.mutations() == 16
    assert mig_devices_by_nvml() == {}


# ---- errors -------------------------------------------------------------------------------------


def _error(call) -> HwError:
    with pytest.raises(HwError) as info:
        call()
    return info.value


def test_a_placement_not_offered_is_an_invalid_argument(mig):
    _, backend = mig(board(A100_40GB))
    err = _error(lambda: backend.create_gpu_instance(0, 9, Placement(2, 4)))
    assert err.kind is ErrorKind.INVALID_ARGUMENT
    assert "GPU 0" in str(err) and "profile 9" in str(err) and "2:4" in str(err)


def test_an_unknown_profile_is_an_invalid_argument(mig):
    _, backend = mig(board(A100_40GB))
    # 2 is an enum (3g) but no device profile ID on an A100.
    err = _error(lambda: backend.create_gpu_instance(0, 2, Placement(0, 4)))
    assert err.kind is ErrorKind.INVALID_ARGUMENT


def test_overlapping_placements_are_insufficient_resources(mig):
    _, backend = mig(board(A100_40GB))
    backend.create_gpu_instance(0, 9, Placement(0, 4))
    err = _error(lambda: backend.create_gpu_instance(0, 14, Placement(2, 2)))
    assert err.kind is ErrorKind.INSUFFICIENT_RESOURCES


def test_exceeding_a_profiles_count_is_insufficient_resources(mig):
    _, backend = mig(board(A100_40GB))
    backend.create_gpu_instance(0, 20, Placement(0, 1))  # 1g.5gb+me: one per GPU
    err = _error(lambda: backend.create_gpu_instance(0, 20, Placement(1, 1)))
    assert err.kind is ErrorKind.INSUFFICIENT_RESOURCES


def test_three_g_pair_leaves_no_room_for_a_one_g(mig):
    _, backend = mig(board(A100_40GB))
    backend.create_gpu_instance(0, 9, Placement(0, 4))
    backend.create_gpu_instance(0, 9, Placement(4, 4))
    for start in range(7):
        err = _error(lambda s=start: backend.create_gpu_instance(0, 19, Placement(s, 1)))
        assert err.kind is ErrorKind.INSUFFICIENT_RESOURCES


def test_destroying_a_gi_with_compute_instances_is_in_use(mig):
    _, backend = mig(board(A100_40GB))
    gi, _ = build_3_2_1_1(backend)[0]
    err = _error(lambda: backend.destroy_gpu_instance(0, gi.gi_id))
    assert err.kind is ErrorKind.IN_USE


def test_destroying_a_ci_a_process_uses_is_in_use(mig):
    fake, backend = mig(board(A100_40GB))
    gi, ci = build_3_2_1_1(backend)[0]
    fake.start_process(0, 4242, 1024, mig_uuid=ci.mig_uuid)
    err = _error(lambda: backend.destroy_compute_instance(0, gi.gi_id, ci.ci_id))
    assert err.kind is ErrorKind.IN_USE
    fake.stop_process(0, 4242)
    backend.destroy_compute_instance(0, gi.gi_id, ci.ci_id)


def test_unknown_instance_ids_are_not_found(mig):
    _, backend = mig(board(A100_40GB))
    gi, _ = build_3_2_1_1(backend)[0]
    assert _error(lambda: backend.destroy_gpu_instance(0, 6)).kind is ErrorKind.NOT_FOUND
    assert _error(lambda: backend.destroy_compute_instance(0, gi.gi_id, 5)).kind is (
        ErrorKind.NOT_FOUND
    )
    assert _error(lambda: backend.create_compute_instance(0, 6, 0)).kind is ErrorKind.NOT_FOUND


@pytest.mark.parametrize(
    ("ci_profile_id", "kind"),
    [(3, ErrorKind.NOT_SUPPORTED), (42, ErrorKind.INVALID_ARGUMENT)],
)
def test_a_ci_profile_the_gi_lacks(mig, ci_profile_id, kind):
    _, backend = mig(board(A100_40GB))
    gi = backend.create_gpu_instance(0, 19, Placement(0, 1))  # a 1g GI offers only 1c
    assert _error(lambda: backend.create_compute_instance(0, gi.gi_id, ci_profile_id)).kind is kind


def test_creating_with_mig_off_is_not_supported(mig):
    _, backend = mig(board(A100_40GB, mig=(0, 1)))
    err = _error(lambda: backend.create_gpu_instance(0, 19, Placement(0, 1)))
    assert err.kind is ErrorKind.NOT_SUPPORTED


def test_not_root_is_no_permission(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 0)), root=False)
    assert _error(lambda: backend.set_mig_mode(0, True)).kind is ErrorKind.NO_PERMISSION
    fake.gpus[0].mig = (1, 1)
    err = _error(lambda: backend.create_gpu_instance(0, 19, Placement(0, 1)))
    assert err.kind is ErrorKind.NO_PERMISSION


def test_a_lost_gpu_is_gpu_is_lost(mig):
    fake, backend = mig(board(A100_40GB))
    build_3_2_1_1(backend)
    fake.gpus[0].lost = True
    assert _error(lambda: backend.mig_state(0)).kind is ErrorKind.GPU_IS_LOST
    assert _error(lambda: backend.destroy_gpu_instance(0, 1)).kind is ErrorKind.GPU_IS_LOST
    assert _error(lambda: backend.processes(0)).kind is ErrorKind.GPU_IS_LOST


def test_a_failing_read_names_the_call(mig):
    fake, backend = mig(board(A100_40GB))
    build_3_2_1_1(backend)
    fake.errors["nvmlGpuInstanceGetInfo"] = Ret.UNKNOWN
    err = _error(lambda: backend.mig_state(0))
    assert err.kind is ErrorKind.UNKNOWN and "read GPU instance" in str(err)


def test_a_driver_without_the_v_profile_call(fake_nvml):
    fake = fake_nvml(FakeNvml([board(A100_40GB)], absent={"nvmlDeviceGetGpuInstanceProfileInfoV"}))
    backend = NvmlBackend()
    backend.open()
    try:
        err = _error(lambda: backend.mig_state(0))
    finally:
        backend.close()
    assert err.kind is ErrorKind.FUNCTION_NOT_FOUND
    assert fake.calls["nvmlDeviceGetGpuInstanceProfileInfo"] == 0


# ---- MIG mode and reset -------------------------------------------------------------------------


@pytest.mark.parametrize("pci_device_id", [A100_40GB, A30, H100_SXM])
def test_enabling_mig_is_pending_exactly_where_the_family_needs_a_reset(mig, pci_device_id):
    fake, backend = mig(board(pci_device_id, mig=(0, 0)))
    state = backend.set_mig_mode(0, True)
    if family(pci_device_id).mode_change_needs_reset:
        assert state == MigState(MigMode.DISABLED, MigMode.ENABLED)
        assert backend.mig_state(0).profiles == family(pci_device_id).profiles  # still catalog
        assert backend.reset_gpu(0) == ENABLED
    else:
        assert state == ENABLED
    assert fake.calls["nvmlDeviceSetMigMode"] == 1
    assert backend.mig_state(0).mode == ENABLED


def test_asking_for_the_current_mode_changes_nothing(mig):
    _, backend = mig(board(A100_40GB, mig=(1, 1)))
    assert backend.set_mig_mode(0, True) == ENABLED


def test_set_mig_mode_while_in_use_stays_pending(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 0)))
    fake.start_process(0, 777, 300)
    err = _error(lambda: backend.set_mig_mode(0, True))
    assert err.kind is ErrorKind.IN_USE
    assert "pending" in str(err) and "reset the GPU" in str(err)
    assert fake.gpus[0].mig == (0, 1)


def test_disabling_mig_with_instances_is_in_use(mig):
    _, backend = mig(board(H100_SXM))
    backend.create_gpu_instance(0, 19, Placement(0, 1))
    assert _error(lambda: backend.set_mig_mode(0, False)).kind is ErrorKind.IN_USE
    assert backend.mig_state(0).mode == MigState(MigMode.ENABLED, MigMode.DISABLED)


def test_set_mig_mode_where_the_platform_cannot_reset(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 0)))
    fake.gpus[0].activation_status = Ret.RESET_REQUIRED
    err = _error(lambda: backend.set_mig_mode(0, True))
    assert err.kind is ErrorKind.RESET_REQUIRED and "reboot" in str(err)


def test_set_mig_mode_on_a_board_without_mig(fake_nvml):
    fake_nvml(t4())
    backend = NvmlBackend()
    backend.open()
    try:
        assert _error(lambda: backend.set_mig_mode(0, True)).kind is ErrorKind.NOT_SUPPORTED
    finally:
        backend.close()


def test_reset_runs_nvidia_smi_with_nvml_let_go(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 1)), reset_timeout_s=90)
    recorder = backend._run
    assert backend.reset_gpu(0) == ENABLED
    assert recorder.calls == [(["nvidia-smi", "-r", "-i", "00000000:07:00.0"], 90)]
    assert recorder.nvml_refs_during == [0]  # gpud held no NVML reference while it ran
    assert fake.init_count == 1 and fake.resets == [0]
    assert backend.mig_state(0).instances == ()


def test_instances_do_not_survive_a_reset(mig):
    _, backend = mig(board(A100_40GB))
    build_3_2_1_1(backend)
    assert backend.reset_gpu(0) == ENABLED
    assert backend.mig_state(0).instances == ()
    assert mig_devices_by_nvml() == {}


def test_reset_refused_while_processes_run(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 1)))
    fake.start_process(0, 31337, 100)
    err = _error(lambda: backend.reset_gpu(0))
    assert err.kind is ErrorKind.IN_USE and "31337" in str(err)
    assert backend._run.calls == []
    assert fake.init_count == 1


@pytest.mark.parametrize(
    ("returncode", "stderr", "kind"),
    [
        (255, "GPU 00000000:07:00.0 is currently in use by another process.", ErrorKind.UNKNOWN),
        (4, "Insufficient Permissions", ErrorKind.NO_PERMISSION),
        (1, "", ErrorKind.UNKNOWN),
    ],
)
def test_a_failed_reset_is_an_hw_error_with_its_output(fake_nvml, returncode, stderr, kind):
    fake = fake_nvml(FakeNvml([board(A100_40GB, mig=(0, 1))]))
    recorder = Recorder(fake, returncode=returncode, stderr=stderr)
    backend = NvmlBackend(command_runner=recorder)
    backend.open()
    try:
        err = _error(lambda: backend.reset_gpu(0))
        assert err.kind is kind
        assert f"exit status {returncode}" in str(err)
        assert (stderr or "no output") in str(err)
        assert "nvidia-smi -r -i 00000000:07:00.0" in str(err)
        # NVML is back and the board untouched: still pending.
        assert backend.mig_state(0).mode == MigState(MigMode.DISABLED, MigMode.ENABLED)
    finally:
        backend.close()
    assert fake.init_count == 0


@pytest.mark.parametrize(
    ("raised", "kind", "hint"),
    [
        (FileNotFoundError(2, "No such file or directory"), ErrorKind.NOT_FOUND, "nvidia-utils"),
        (subprocess.TimeoutExpired(["nvidia-smi"], 5), ErrorKind.TIMEOUT, "did not finish"),
        (PermissionError(13, "Permission denied"), ErrorKind.NO_PERMISSION, "cannot run"),
    ],
)
def test_a_reset_that_cannot_run(fake_nvml, raised, kind, hint):
    fake = fake_nvml(FakeNvml([board(A100_40GB, mig=(0, 1))]))
    backend = NvmlBackend(command_runner=Recorder(fake, raises=raised), reset_timeout_s=5)
    backend.open()
    try:
        err = _error(lambda: backend.reset_gpu(0))
        assert err.kind is kind and hint in str(err)
        backend.gpus()  # open again afterwards
    finally:
        backend.close()


def test_events_flow_again_after_a_reset(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 1)), event_wait_ms=50)
    events: queue.Queue[HwEvent] = queue.Queue()
    backend.start_events(events.put)
    first_set = next(iter(fake.sets))
    backend.reset_gpu(0)
    assert first_set in fake.freed_sets
    assert backend._thread is not None and backend._thread.is_alive()
    fake.push_xid(0, 79)
    event = events.get(timeout=5)
    assert (event.kind, event.uuid, event.xid) == (EventKind.XID, GPU_UUID, 79)


def test_other_calls_during_a_reset_say_why_they_fail(fake_nvml):
    fake_nvml(FakeNvml([board(A100_40GB, mig=(0, 1))]))
    seen: list[HwError] = []

    def runner(argv, timeout):
        with pytest.raises(HwError) as info:
            backend.gpus()
        seen.append(info.value)
        return subprocess.CompletedProcess(argv, 0, "", "")

    backend = NvmlBackend(command_runner=runner)
    backend.open()
    try:
        backend.reset_gpu(0)
    finally:
        backend.close()
    assert seen[0].kind is ErrorKind.UNINITIALIZED and "GPU 0 resets" in str(seen[0])


def test_the_default_runner_runs_without_a_shell():
    done = run_command(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    with pytest.raises(FileNotFoundError):
        run_command(["/nonexistent/nvidia-smi", "-r"], 10)


# ---- processes ----------------------------------------------------------------------------------


def test_processes_on_a_gpu_without_mig(mig):
    fake, backend = mig(board(A100_40GB, mig=(0, 0)))
    assert backend.processes(0) == ()
    fake.start_process(0, 100, 2048)
    fake.start_process(0, 7, 512)
    assert backend.processes(0) == (GpuProcess(7, None, 512), GpuProcess(100, None, 2048))


def test_processes_on_mig_devices(mig):
    fake, backend = mig(board(A100_40GB))
    made = build_3_2_1_1(backend)
    (_, ci_a), (_, ci_b) = made[0], made[2]
    fake.start_process(0, 10, 1000, mig_uuid=ci_a.mig_uuid)
    fake.start_process(0, 11, 200, mig_uuid=ci_b.mig_uuid)
    fake.start_process(0, 12, 300, mig_uuid=ci_b.mig_uuid)
    assert backend.processes(0) == (
        GpuProcess(10, ci_a.mig_uuid, 1000),
        GpuProcess(11, ci_b.mig_uuid, 200),
        GpuProcess(12, ci_b.mig_uuid, 300),
    )
    # Both the aggregate (GPU handle) and each MIG device were asked.
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v3"] >= 1 + 4


def test_processes_without_the_aggregate_come_from_each_mig_device(mig):
    fake, backend = mig(board(A100_40GB))
    (_, ci_a), (_, ci_b) = build_3_2_1_1(backend)[:2]
    fake.start_process(0, 20, 100, mig_uuid=ci_a.mig_uuid)
    fake.start_process(0, 21, 200, mig_uuid=ci_b.mig_uuid)
    fake.root = False  # the GPU handle no longer answers for the MIG devices
    assert backend.processes(0) == (
        GpuProcess(20, ci_a.mig_uuid, 100),
        GpuProcess(21, ci_b.mig_uuid, 200),
    )


def test_processes_not_supported_means_none(mig):
    fake, backend = mig(board(A100_40GB))
    build_3_2_1_1(backend)
    fake.errors["nvmlDeviceGetComputeRunningProcesses_v3"] = Ret.NOT_SUPPORTED
    assert backend.processes(0) == ()


def test_processes_on_a_driver_without_v3(fake_nvml):
    fake = fake_nvml(
        FakeNvml([board(A100_40GB, mig=(0, 0))], absent={"nvmlDeviceGetComputeRunningProcesses_v3"})
    )
    fake.start_process(0, 5, 64)
    backend = NvmlBackend()
    backend.open()
    try:
        assert backend.processes(0) == (GpuProcess(5, None, 64),)
    finally:
        backend.close()
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 2  # count, then fetch


def test_the_fake_tags_aggregate_processes_with_their_instance(fake_nvml):
    """The GPU handle's list carries GI/CI IDs (0xFFFFFFFF off MIG), as nvml.h documents."""
    fake = fake_nvml(FakeNvml([board(A100_40GB)]))
    with NvmlBackendOpen() as backend:
        gi, ci = build_3_2_1_1(backend)[1]
        fake.start_process(0, 9, 1, mig_uuid=ci.mig_uuid)
        fake.start_process(0, 8, 1)
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    tags = {p.pid: (p.gpuInstanceId, p.computeInstanceId) for p in procs}
    assert tags == {9: (gi.gi_id, ci.ci_id), 8: (NO_INSTANCE, NO_INSTANCE)}


def test_fake_structs_agree_with_pynvml():
    """The fake declares its structs from nvml.h; pynvml's version constants encode their size."""
    assert pynvml.nvmlGpuInstanceProfileInfo_v2 == GI_PROFILE_INFO_V2
    assert pynvml.nvmlComputeInstanceProfileInfo_v2 == CI_PROFILE_INFO_V2
    assert ctypes.sizeof(pynvml.c_nvmlProcessInfo_v3_t) == ctypes.sizeof(ProcessInfo)


# ---- any sequence of calls reads back as what the calls returned ---------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["gi", "ci", "destroy_ci", "destroy_gi"]), st.integers(0, 10**6)),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pci_device_id=st.sampled_from([A100_40GB, A30, H100_SXM]), ops=OPS)
def test_random_call_sequences_read_back_as_returned(pci_device_id, ops):
    """Whatever succeeds is exactly what mig_state reads back; whatever fails fails with a MIG
    error kind and changes nothing."""
    fam = family(pci_device_id)
    allowed = {
        ErrorKind.INVALID_ARGUMENT,
        ErrorKind.INSUFFICIENT_RESOURCES,
        ErrorKind.IN_USE,
        ErrorKind.NOT_SUPPORTED,
    }
    fake = FakeNvml([board(pci_device_id)])
    with installed(fake), NvmlBackendOpen() as backend:
        model: dict[int, GpuInstance] = {}
        for op, pick in ops:
            before = backend.mig_state(0).instances
            try:
                if op == "gi":
                    profile = fam.profiles[pick % len(fam.profiles)]
                    # mostly offered placements, now and then one that is not
                    places = [*profile.placements, Placement(pick % 9, profile.memory_slices)]
                    gi = backend.create_gpu_instance(
                        0, profile.profile_id, places[pick % len(places)]
                    )
                    model[gi.gi_id] = gi
                elif not model:
                    continue
                else:
                    gi = list(model.values())[pick % len(model)]
                    profile = next(p for p in fam.profiles if p.profile_id == gi.profile_id)
                    if op == "ci":
                        ci_profile = profile.compute_profiles[pick % len(profile.compute_profiles)]
                        ci = backend.create_compute_instance(0, gi.gi_id, ci_profile.profile_id)
                        cis = sorted((*gi.compute_instances, ci), key=lambda c: c.ci_id)
                        model[gi.gi_id] = GpuInstance(
                            gi.gi_id, gi.profile_id, gi.placement, tuple(cis)
                        )
                    elif op == "destroy_ci" and gi.compute_instances:
                        ci = gi.compute_instances[pick % len(gi.compute_instances)]
                        backend.destroy_compute_instance(0, gi.gi_id, ci.ci_id)
                        rest = tuple(c for c in gi.compute_instances if c is not ci)
                        model[gi.gi_id] = GpuInstance(gi.gi_id, gi.profile_id, gi.placement, rest)
                    elif op == "destroy_gi":
                        backend.destroy_gpu_instance(0, gi.gi_id)
                        del model[gi.gi_id]
            except HwError as err:
                assert err.kind in allowed, err
                assert backend.mig_state(0).instances == before
            state = backend.mig_state(0)
            assert state.instances == tuple(model[k] for k in sorted(model))
            used = [gi.placement for gi in state.instances]
            assert all(not a.overlaps(b) for i, a in enumerate(used) for b in used[i + 1 :]), used
        assert mig_devices_by_nvml() == {
            (gi.gi_id, ci.ci_id): ci.mig_uuid
            for gi in model.values()
            for ci in gi.compute_instances
        }
    assert not fake.internal_errors, fake.internal_errors
