"""The NVML backend, tested below pynvml: pynvml's real marshalling runs against a fake library."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import pynvml
import pytest

from gpud.hw.backend import Backend
from gpud.hw.errors import BackendUnavailable, ErrorKind, HwError
from gpud.hw.nvml import NvmlBackend, format_cuda_version, lost_uuid, to_hw_error
from gpud.hw.types import (
    MIG_UNSUPPORTED,
    NO_INSTANCE,
    EventKind,
    GpuInfo,
    HwEvent,
    MigMode,
    MigState,
    NvLinkPeer,
    SystemInfo,
)
from tests.fakenvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_XID,
    FakeGpu,
    FakeLink,
    FakeNvml,
    QueuedEvent,
    Ret,
    dgx_a100,
    dgx_a100_uuid,
    t4,
)

A100_BUS_IDS = [
    "00000000:07:00.0",
    "00000000:0F:00.0",
    "00000000:47:00.0",
    "00000000:4E:00.0",
    "00000000:87:00.0",
    "00000000:90:00.0",
    "00000000:B7:00.0",
    "00000000:BD:00.0",
]
UUIDS = [dgx_a100_uuid(i) for i in range(8)]


def expected_dgx_a100() -> list[GpuInfo]:
    return [
        GpuInfo(
            index=i,
            uuid=UUIDS[i],
            name="NVIDIA A100-SXM4-40GB",
            pci_bus_id=A100_BUS_IDS[i],
            pci_device_id=0x20B010DE,
            memory_mib=40960,
            minor_number=i,
            numa_node=0 if i < 4 else 1,
            mig=MigState(MigMode.DISABLED, MigMode.DISABLED),
            nvlink_peers=tuple(NvLinkPeer(UUIDS[j], 12) for j in range(8) if j != i),
            pcie_switch=None,
            lost=False,
            compute_capability=(8, 0),
        )
        for i in range(8)
    ]


@pytest.fixture
def backends():
    opened: list[NvmlBackend] = []

    def make(**kwargs) -> NvmlBackend:
        backend = NvmlBackend(**kwargs)
        backend.open()
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


# ---- open / close -------------------------------------------------------------------------------


def test_is_a_backend():
    assert isinstance(NvmlBackend(), Backend)
    assert NvmlBackend.name == "nvml"


@pytest.mark.parametrize(
    ("code", "kind", "hints"),
    [
        (
            Ret.LIBRARY_NOT_FOUND,
            ErrorKind.LIBRARY_NOT_FOUND,
            ["libnvidia-ml.so.1 not found", "gpudctl driver install", "--simulate"],
        ),
        (Ret.DRIVER_NOT_LOADED, ErrorKind.DRIVER_NOT_LOADED, ["not loaded", "modprobe nvidia"]),
        (Ret.NO_PERMISSION, ErrorKind.NO_PERMISSION, ["permission", "run gpud as root"]),
        (Ret.LIB_RM_VERSION_MISMATCH, ErrorKind.LIB_RM_VERSION_MISMATCH, ["mismatch", "reboot"]),
    ],
)
def test_open_without_a_usable_driver_is_unavailable(fake_nvml, code, kind, hints):
    fake = fake_nvml(dgx_a100(init_error=code))
    backend = NvmlBackend()
    with pytest.raises(BackendUnavailable) as info:
        backend.open()
    assert info.value.kind is kind
    for hint in hints:
        assert hint in str(info.value)
    backend.close()  # nothing was opened: must not call nvmlShutdown
    assert fake.calls["nvmlShutdown"] == 0


def test_library_not_found_goes_through_pynvmls_loader(fake_nvml):
    fake = fake_nvml(dgx_a100(init_error=Ret.LIBRARY_NOT_FOUND))
    with pytest.raises(BackendUnavailable):
        NvmlBackend().open()
    assert pynvml.nvmlLib is None
    assert sum(fake.calls.values()) == 0


def test_other_init_failures_are_plain_hw_errors(fake_nvml):
    fake_nvml(dgx_a100(init_error=Ret.UNKNOWN))
    with pytest.raises(HwError) as info:
        NvmlBackend().open()
    assert not isinstance(info.value, BackendUnavailable)
    assert info.value.kind is ErrorKind.UNKNOWN


def test_to_hw_error_maps_codes():
    assert to_hw_error(pynvml.NVMLError(15), "read").kind is ErrorKind.GPU_IS_LOST
    assert to_hw_error(pynvml.NVMLError(3), "read").kind is ErrorKind.NOT_SUPPORTED
    lost = to_hw_error(pynvml.NVMLError(15), "GPU 3: read UUID")
    assert "GPU 3: read UUID" in str(lost) and "GPU is lost" in str(lost)
    # IRQ_ISSUE (11) has no ErrorKind of its own.
    assert to_hw_error(pynvml.NVMLError(11), "read").kind is ErrorKind.UNKNOWN


def test_close_shuts_nvml_down_once_and_is_idempotent(fake_nvml):
    fake = fake_nvml(dgx_a100())
    backend = NvmlBackend()
    backend.close()  # never opened
    backend.open()
    backend.open()  # already open: no second reference
    assert fake.init_count == 1
    backend.close()
    backend.close()
    assert fake.init_count == 0
    assert fake.calls["nvmlShutdown"] == 1


def test_calls_before_open_fail_as_uninitialized(fake_nvml):
    fake_nvml(dgx_a100())
    with pytest.raises(HwError) as info:
        NvmlBackend().gpus()
    assert info.value.kind is ErrorKind.UNINITIALIZED


# ---- system -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "text"), [(12020, "12.2"), (12040, "12.4"), (11080, "11.8")])
def test_system_versions(fake_nvml, backends, raw, text):
    fake_nvml(dgx_a100(cuda_version=raw))
    assert backends().system() == SystemInfo(
        backend="nvml",
        driver_version="535.183.01",
        cuda_version=text,
        nvml_version="12.535.183.01",
    )


def test_format_cuda_version():
    assert format_cuda_version(12040) == "12.4"
    assert format_cuda_version(13000) == "13.0"
    assert format_cuda_version(0) == ""


def test_system_versions_not_supported_are_empty(fake_nvml, backends):
    not_supported = {
        name: Ret.NOT_SUPPORTED
        for name in (
            "nvmlSystemGetDriverVersion",
            "nvmlSystemGetCudaDriverVersion_v2",
            "nvmlSystemGetNVMLVersion",
        )
    }
    fake_nvml(dgx_a100(errors=not_supported))
    assert backends().system() == SystemInfo(backend="nvml")


def test_system_falls_back_to_the_old_cuda_version_call(fake_nvml, backends):
    fake = fake_nvml(dgx_a100(cuda_version=11040, absent={"nvmlSystemGetCudaDriverVersion_v2"}))
    assert backends().system().cuda_version == "11.4"
    assert fake.calls["nvmlSystemGetCudaDriverVersion"] == 1


def test_system_other_failures_raise(fake_nvml, backends):
    fake_nvml(dgx_a100(errors={"nvmlSystemGetDriverVersion": Ret.NO_PERMISSION}))
    with pytest.raises(HwError) as info:
        backends().system()
    assert info.value.kind is ErrorKind.NO_PERMISSION


# ---- gpus ---------------------------------------------------------------------------------------


def test_dgx_a100_inventory(fake_nvml, backends):
    fake_nvml(dgx_a100())
    gpus = backends().gpus()
    assert gpus == expected_dgx_a100()
    assert gpus[0].pci_device_id_hex == "0x20B010DE"
    assert gpus[7].device_path == "/dev/nvidia7"


@pytest.mark.parametrize(
    ("modes", "state"),
    [
        ((0, 0), MigState(MigMode.DISABLED, MigMode.DISABLED)),
        ((1, 1), MigState(MigMode.ENABLED, MigMode.ENABLED)),
        ((0, 1), MigState(MigMode.DISABLED, MigMode.ENABLED)),
        ((1, 0), MigState(MigMode.ENABLED, MigMode.DISABLED)),
    ],
)
def test_mig_mode(fake_nvml, backends, modes, state):
    fake = dgx_a100()
    fake.gpus[2].mig = modes
    fake_nvml(fake)
    gpus = backends().gpus()
    assert gpus[2].mig == state
    assert gpus[2].mig.capable
    assert gpus[1].mig == MigState(MigMode.DISABLED, MigMode.DISABLED)


def test_t4_without_mig_nvlink_or_numa(fake_nvml, backends):
    fake = fake_nvml(t4())
    assert backends().gpus() == [
        GpuInfo(
            index=0,
            uuid="GPU-9c2b5f0e-1d3a-4b6c-8e7f-0a1b2c3d4e5f",
            name="Tesla T4",
            pci_bus_id="00000000:00:1E.0",
            pci_device_id=0x1EB810DE,
            memory_mib=15360,
            minor_number=0,
            numa_node=None,
            mig=MIG_UNSUPPORTED,
            nvlink_peers=(),
            compute_capability=(7, 5),
        )
    ]
    # NOT_SUPPORTED on link 0 means no NVLink at all: the other 35 links are not asked.
    assert fake.calls["nvmlDeviceGetNvLinkState"] == 1


def test_numa_call_missing_from_an_old_driver(fake_nvml, backends):
    fake_nvml(dgx_a100(absent={"nvmlDeviceGetNumaNodeId"}))
    assert [gpu.numa_node for gpu in backends().gpus()] == [None] * 8


def test_compute_capability_unknown_to_the_driver_is_none(fake_nvml, backends):
    # Node labels omit the GPU family then (as GPU Feature Discovery does for major 0); the
    # inventory itself must not fail over it.
    fake = dgx_a100(absent={"nvmlDeviceGetCudaComputeCapability"})
    fake_nvml(fake)
    assert [gpu.compute_capability for gpu in backends().gpus()] == [None] * 8


def test_memory_not_supported_does_not_fail_the_inventory(fake_nvml, backends):
    fake = dgx_a100()
    fake.gpus[4].errors["nvmlDeviceGetMemoryInfo"] = Ret.NOT_SUPPORTED
    fake_nvml(fake)
    gpus = backends().gpus()
    assert gpus[4].memory_mib == 0
    assert gpus[3].memory_mib == 40960


def test_direct_nvlinks_without_switches(fake_nvml, backends):
    """Four GPUs: 0-1 by two links, 0-2 by one, 2-3 by four, one inactive link on 3."""
    wiring = {
        0: [FakeLink(peer=1), FakeLink(peer=1), FakeLink(peer=2)],
        1: [FakeLink(peer=0), FakeLink(peer=0)],
        2: [FakeLink(peer=0)] + [FakeLink(peer=3)] * 4,
        3: [FakeLink(peer=2)] * 4 + [FakeLink(peer=0, active=False)],
    }
    gpus = [
        FakeGpu(uuid=f"GPU-0000000{i}-0000-0000-0000-000000000000", bus_id=bus, minor=i, nvlinks=w)
        for (i, w), bus in zip(wiring.items(), A100_BUS_IDS[:4], strict=True)
    ]
    fake_nvml(FakeNvml(gpus))
    got = backends().gpus()

    def links(i: int) -> dict[int, int]:
        by_uuid = {g.uuid: g.index for g in got}
        return {by_uuid[p.uuid]: p.links for p in got[i].nvlink_peers}

    assert links(0) == {1: 2, 2: 1}
    assert links(1) == {0: 2}
    assert links(2) == {0: 1, 3: 4}
    assert links(3) == {2: 4}
    assert got[0].nvlinks_to(got[1].uuid) == 2


def test_a_gpu_lost_from_the_start_is_listed(fake_nvml, backends):
    fake = dgx_a100()
    fake.gpus[3].lost = True
    fake_nvml(fake)
    gpus = backends().gpus()
    assert [g.index for g in gpus] == list(range(8))
    lost = gpus[3]
    assert lost.lost
    assert lost.uuid == lost_uuid(3) == "GPU-LOST-3"
    assert lost.nvlink_peers == ()
    assert [g.lost for g in gpus].count(True) == 1
    # The others still see each other, and not the board that fell off.
    assert [p.uuid for p in gpus[0].nvlink_peers] == [UUIDS[j] for j in (1, 2, 4, 5, 6, 7)]


@pytest.mark.parametrize("at_handle", [False, True])
def test_a_gpu_lost_later_keeps_what_was_known(fake_nvml, backends, at_handle):
    fake = fake_nvml(dgx_a100())
    backend = backends()
    before = backend.gpus()
    fake.gpus[5].lost = True
    fake.gpus[5].lost_handle = at_handle
    after = backend.gpus()
    assert after[5] == dataclasses.replace(before[5], lost=True)
    assert after[5].uuid == UUIDS[5]
    assert after[:5] + after[6:] != before[:5] + before[6:]  # peers of GPU 5 are gone
    assert all(UUIDS[5] not in [p.uuid for p in g.nvlink_peers] for g in after if g.index != 5)


def test_a_gpu_failing_otherwise_fails_the_call(fake_nvml, backends):
    fake = dgx_a100()
    fake.gpus[1].errors["nvmlDeviceGetName"] = Ret.UNKNOWN
    fake_nvml(fake)
    with pytest.raises(HwError) as info:
        backends().gpus()
    assert info.value.kind is ErrorKind.UNKNOWN
    assert "GPU 1" in str(info.value)


# ---- events -------------------------------------------------------------------------------------


def collector() -> tuple[queue.Queue[HwEvent], object]:
    events: queue.Queue[HwEvent] = queue.Queue()
    return events, events.put


def no_more(events: queue.Queue[HwEvent], seconds: float = 0.3) -> bool:
    try:
        events.get(timeout=seconds)
    except queue.Empty:
        return True
    return False


def test_xid_event_reaches_the_sink(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    fake.push_xid(3, 79)
    event = events.get(timeout=1.0)
    assert event == HwEvent(EventKind.XID, UUIDS[3], xid=79)
    assert (event.gi_id, event.ci_id) == (NO_INSTANCE, NO_INSTANCE)


def test_xid_event_keeps_the_mig_instance(fake_nvml, backends):
    fake = dgx_a100()
    fake.gpus[2].mig = (1, 1)
    fake_nvml(fake)
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    fake.push_xid(2, 43, gi=1, ci=0)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[2], xid=43, gi_id=1, ci_id=0)


def test_double_bit_ecc_is_reported_as_xid_48(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    fake.push_event(QueuedEvent(6, EVENT_DOUBLE_BIT_ECC))
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[6], xid=48)


def test_only_xid_and_double_bit_events_are_registered(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    backends(event_wait_ms=200).start_events(lambda event: None)
    (registered,) = fake.sets.values()
    assert set(registered.values()) == {EVENT_XID | EVENT_DOUBLE_BIT_ECC}
    assert len(registered) == 8


def test_gpu_lost_during_wait(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    (first_set,) = fake.sets
    fake.lose(6)
    assert events.get(timeout=1.0) == HwEvent(EventKind.GPU_LOST, UUIDS[6])
    # The set was rebuilt without the lost board, so the others are heard again...
    fake.push_xid(1, 79)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[1], xid=79)
    assert first_set in fake.freed_sets
    (second_set,) = fake.sets.values()
    assert fake.handle_of(6) not in second_set and len(second_set) == 7
    # ...and the loss is reported once.
    assert no_more(events)


def test_gpu_lost_is_reported_once_while_the_set_cannot_be_rebuilt(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    backend = backends(event_wait_ms=200, retry_s=0.02)
    events, sink = collector()
    backend.start_events(sink)
    fake.errors["nvmlEventSetCreate"] = Ret.UNKNOWN
    fake.lose(6)
    assert events.get(timeout=1.0) == HwEvent(EventKind.GPU_LOST, UUIDS[6])
    deadline = time.monotonic() + 1.0
    while fake.calls["nvmlEventSetCreate"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.calls["nvmlEventSetCreate"] >= 4  # retried, each time finding GPU 6 lost
    assert no_more(events, 0.1)
    del fake.errors["nvmlEventSetCreate"]
    fake.push_xid(1, 79)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[1], xid=79)


def test_gpu_lost_before_events_start(fake_nvml, backends):
    fake = dgx_a100()
    fake.gpus[0].lost = True
    fake_nvml(fake)
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    assert events.get(timeout=1.0) == HwEvent(EventKind.GPU_LOST, lost_uuid(0))
    fake.push_xid(7, 94)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[7], xid=94)


@pytest.mark.parametrize("how", ["supported-types", "register"])
def test_event_registration_not_supported_on_one_gpu(fake_nvml, backends, caplog, how):
    fake = dgx_a100()
    if how == "supported-types":
        fake.gpus[2].supported_events = None
    else:
        fake.gpus[2].errors["nvmlDeviceRegisterEvents"] = Ret.NOT_SUPPORTED
    fake_nvml(fake)
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    assert UUIDS[2] in caplog.text and "no XID health" in caplog.text
    fake.push_xid(2, 79)  # not registered: the driver never delivers it
    fake.push_xid(5, 79)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[5], xid=79)
    assert no_more(events)


def test_event_types_are_masked_with_what_the_gpu_supports(fake_nvml, backends):
    fake = dgx_a100()
    fake.gpus[4].supported_events = EVENT_XID  # e.g. no ECC on this board
    fake_nvml(fake)
    backend = backends(event_wait_ms=200)
    events, sink = collector()
    backend.start_events(sink)
    (registered,) = fake.sets.values()
    assert registered[fake.handle_of(4)] == EVENT_XID
    fake.push_xid(4, 79)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[4], xid=79)


def test_a_failing_sink_does_not_stop_events(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    backend = backends(event_wait_ms=200)
    events: queue.Queue[HwEvent] = queue.Queue()

    def sink(event: HwEvent) -> None:
        events.put(event)
        if event.xid == 13:
            raise RuntimeError("sink bug")

    backend.start_events(sink)
    fake.push_xid(0, 13)
    fake.push_xid(0, 79)
    assert [events.get(timeout=1.0).xid, events.get(timeout=1.0).xid] == [13, 79]


def test_wait_errors_are_retried(fake_nvml, backends):
    fake = fake_nvml(dgx_a100())
    fake.errors["nvmlEventSetWait_v2"] = Ret.UNKNOWN
    backend = backends(event_wait_ms=200, retry_s=0.05)
    events, sink = collector()
    backend.start_events(sink)
    deadline = time.monotonic() + 1.0
    while fake.calls["nvmlEventSetWait_v2"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.calls["nvmlEventSetWait_v2"] >= 3
    del fake.errors["nvmlEventSetWait_v2"]
    fake.push_xid(3, 79)
    assert events.get(timeout=1.0) == HwEvent(EventKind.XID, UUIDS[3], xid=79)


def test_start_events_twice_is_refused(fake_nvml, backends):
    fake_nvml(dgx_a100())
    backend = backends(event_wait_ms=200)
    backend.start_events(lambda event: None)
    with pytest.raises(RuntimeError):
        backend.start_events(lambda event: None)


def event_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gpud-nvml-events"]


def test_close_stops_the_event_thread_promptly(fake_nvml):
    fake = fake_nvml(dgx_a100())
    backend = NvmlBackend()  # the production wait of 1 s
    backend.open()
    backend.start_events(lambda event: None)
    assert fake.waiting.wait(1.0)
    (thread,) = event_threads()
    started = time.monotonic()
    backend.close()
    assert time.monotonic() - started < 1.5
    assert not thread.is_alive()
    assert fake.sets == {} and len(fake.freed_sets) == 1
    assert fake.init_count == 0
    # Events after close go nowhere and nothing is left waiting.
    fake.push_xid(1, 79)
    assert not fake.waiting.wait(0.2)
