"""Device rows to dcgm-exporter's metric families: its default counters under its names, HELP
texts, types, labels (names, order, values) and units, so dashboard 12239, alerts and queries
written for dcgm-exporter keep working (shared/reference/cluster-integration.md §1.2-§1.5).

Pure: the rows (gpud.observe.rows) carry everything, read at the scrape. Where gpud reports
more than dcgm-exporter: every pod sharing a time-sliced GPU gets its own row (dcgm-exporter
keeps one of them), and renamed shared resources are attributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.metrics_core import Metric

from gpud.hw.telemetry import GpuReading, MigReading
from gpud.hw.types import GpuInfo
from gpud.node.state import XidRecord
from gpud.observe.pods import PodRef
from gpud.observe.rows import DeviceRow

# Where a field's value comes from on a GPU-instance row (a whole GPU reads all from its GPU):
# "gpu": the parent GPU's, repeated on every instance row; "instance": the GPU instance's own;
# "whole": only whole GPUs have it (NVML does not support it in MIG mode).
Scope = Literal["gpu", "instance", "whole"]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: Literal["gauge", "counter"]
    help: str
    attr: str
    scope: Scope
    # DCGM's int64 fields print as integers; the others with six decimals.
    integer: bool = True


XID_FIELD = "DCGM_FI_DEV_XID_ERRORS"
XID_HELP = "Value of the last XID error encountered."

# dcgm-exporter's default counters in the order of its default-counters.csv; XID_ERRORS comes
# after DEC_UTIL, from gpud's event record rather than a reading.
FIELDS_BEFORE_XID: tuple[Field, ...] = (
    Field("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", "sm_clock_mhz", "gpu"),
    Field(
        "DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", "mem_clock_mhz", "gpu"
    ),
    Field("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", "memory_temp_c", "gpu"),
    Field("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "gpu_temp_c", "gpu"),
    Field("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "power_w", "gpu", False),
    Field(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        "energy_mj",
        "gpu",
    ),
    Field(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "counter",
        "Total number of PCIe retries.",
        "pcie_replay_count",
        "gpu",
    ),
    Field("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "gpu_util_pct", "whole"),
    Field(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "gauge",
        "Memory utilization (in %).",
        "mem_copy_util_pct",
        "whole",
    ),
    Field("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", "enc_util_pct", "whole"),
    Field("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", "dec_util_pct", "whole"),
)
FIELDS_AFTER_XID: tuple[Field, ...] = (
    Field(
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        "fb_free_mib",
        "instance",
    ),
    Field(
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        "fb_used_mib",
        "instance",
    ),
    Field(
        "DCGM_FI_DEV_FB_RESERVED",
        "gauge",
        "Framebuffer memory reserved (in MiB).",
        "fb_reserved_mib",
        "instance",
    ),
    Field(
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "counter",
        "Total number of NVLink bandwidth counters for all lanes",
        "nvlink_bandwidth_mb_per_s",
        "gpu",
    ),
    Field(
        "DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status", "vgpu_licensed", "gpu"
    ),
    Field(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
        "remapped_rows_uncorrectable",
        "gpu",
    ),
    Field(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for correctable errors",
        "remapped_rows_correctable",
        "gpu",
    ),
    Field(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "gauge",
        "Whether remapping of rows has failed",
        "row_remap_failure",
        "gpu",
    ),
    Field(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "gauge",
        "Ratio of time the graphics engine is active.",
        "gr_engine_active_ratio",
        "instance",
        False,
    ),
    Field(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        "tensor_active_ratio",
        "instance",
        False,
    ),
    Field(
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        "dram_active_ratio",
        "instance",
        False,
    ),
    Field(
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
        "pcie_tx_bytes_per_s",
        "gpu",
    ),
    Field(
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
        "pcie_rx_bytes_per_s",
        "gpu",
    ),
)

# err_msg of DCGM_FI_DEV_XID_ERRORS: gpud's own short names of the XIDs operators meet most
# (NVIDIA's XID catalogue); others read "Unknown Error" with their number in err_code.
XID_NAMES: dict[int, str] = {
    0: "No Error",
    13: "Graphics Engine Exception",
    31: "GPU memory page fault",
    32: "Invalid or corrupted push buffer stream",
    43: "GPU stopped processing",
    45: "Preemptive cleanup, due to previous errors",
    48: "Double Bit ECC Error",
    61: "Internal micro-controller breakpoint/warning",
    62: "Internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    68: "NVDEC0 Exception",
    69: "Graphics Engine class error",
    74: "NVLINK Error",
    79: "GPU has fallen off the bus",
    92: "High single-bit ECC error rate",
    94: "Contained ECC error",
    95: "Uncontained ECC error",
    109: "Context Switch Timeout Error",
    119: "GSP RPC Timeout",
    120: "GSP Error",
}
UNKNOWN_XID = "Unknown Error"


@dataclass(frozen=True, slots=True)
class Entity:
    """One row of dcgm-exporter's output before pods: a whole GPU, or one GPU instance (its
    compute instances' holders and last XIDs folded together, as DCGM reports a GI)."""

    gpu: GpuInfo
    reading: GpuReading | None
    gi_id: int | None
    profile: str | None
    instance: MigReading | None
    last_xid: XidRecord | None
    pods: tuple[PodRef, ...]


def entities(rows: Sequence[DeviceRow]) -> tuple[Entity, ...]:
    """Whole-GPU rows as they are; MIG rows merged per GPU instance, in row order."""
    out: list[Entity] = []
    by_gi: dict[tuple[int, int], int] = {}
    for row in rows:
        if row.mig_uuid is None or row.gi_id is None:
            out.append(Entity(row.gpu, row.reading, None, None, None, row.last_xid, row.pods))
            continue
        key = (row.gpu.index, row.gi_id)
        at = by_gi.get(key)
        if at is None:
            by_gi[key] = len(out)
            out.append(
                Entity(
                    row.gpu,
                    row.reading,
                    row.gi_id,
                    row.profile,
                    row.instance,
                    row.last_xid,
                    row.pods,
                )
            )
            continue
        was = out[at]
        out[at] = Entity(
            was.gpu,
            was.reading,
            was.gi_id,
            was.profile,
            was.instance,
            _later(was.last_xid, row.last_xid),
            tuple(sorted(set(was.pods) | set(row.pods))),
        )
    return tuple(out)


def dcgm_families(rows: Sequence[DeviceRow], driver_version: str, hostname: str) -> list[Metric]:
    """dcgm-exporter's families for ``rows``; a value the GPU does not have is absent, not 0,
    and a device several containers hold is one sample per container."""
    labelled = [(e, _labels(e, driver_version, hostname)) for e in entities(rows)]
    # Each row's label sets (one per holder), made once and shared by every family.
    held = [(e, _with_pods(e, labels)) for e, labels in labelled]
    families = [_family(f, held) for f in FIELDS_BEFORE_XID]
    families.append(_xid_family(labelled))
    families.extend(_family(f, held) for f in FIELDS_AFTER_XID)
    return families


def _labels(entity: Entity, driver_version: str, hostname: str) -> dict[str, str]:
    gpu = entity.gpu
    labels = {
        "gpu": str(gpu.index),
        "UUID": gpu.uuid,
        "pci_bus_id": gpu.pci_bus_id,
        "device": f"nvidia{gpu.index}",
        "modelName": gpu.name,
    }
    if entity.gi_id is not None:
        labels["GPU_I_PROFILE"] = entity.profile or ""
        labels["GPU_I_ID"] = str(entity.gi_id)
    if hostname:
        labels["hostname"] = hostname
    if driver_version:
        labels["DCGM_FI_DRIVER_VERSION"] = driver_version
    return labels


def _with_pods(
    entity: Entity, labels: dict[str, str], xid: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """One label set per holder, its attributes in dcgm-exporter's sorted order (container,
    err_code, err_msg, namespace, pod); the bare row when nobody holds the device."""
    if not entity.pods:
        return [{**labels, **(xid or {})}]
    return [
        {
            **labels,
            "container": p.container,
            **(xid or {}),
            "namespace": p.namespace,
            "pod": p.pod,
        }
        for p in entity.pods
    ]


def _value(field: Field, entity: Entity) -> float | None:
    source: GpuReading | MigReading | None = entity.reading
    if entity.gi_id is not None:
        if field.scope == "whole":
            return None
        if field.scope == "instance":
            source = entity.instance
    if source is None:
        return None
    value = getattr(source, field.attr)
    if value is None:
        return None
    if field.integer:
        return int(value)
    return float(value)


def _family(field: Field, held: list[tuple[Entity, list[dict[str, str]]]]) -> Metric:
    family = Metric(field.name, field.help, field.type)
    for entity, label_sets in held:
        value = _value(field, entity)
        if value is None:
            continue
        for labels in label_sets:
            family.add_sample(field.name, labels, value)
    return family


def _xid_family(labelled: list[tuple[Entity, dict[str, str]]]) -> Metric:
    """The last XID of each device (0 before any), as dcgm-exporter keeps it until restart."""
    family = Metric(XID_FIELD, XID_HELP, "gauge")
    for entity, labels in labelled:
        xid = entity.last_xid.xid if entity.last_xid is not None else 0
        attrs = {"err_code": str(xid), "err_msg": XID_NAMES.get(xid, UNKNOWN_XID)}
        for sample_labels in _with_pods(entity, labels, attrs):
            family.add_sample(XID_FIELD, sample_labels, xid)
    return family


def _later(a: XidRecord | None, b: XidRecord | None) -> XidRecord | None:
    if a is None or b is None:
        return a or b
    return b if b.at > a.at else a
