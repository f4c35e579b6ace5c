"""Rendering gpudctl's answers: plain data for json/yaml, aligned tables for people.

The data form is the contract scripts rely on (``gpudctl status -o json``); tables are derived
from it, so both always say the same thing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from gpud._proto.gpud.v1 import gpud_pb2

FORMATS = ("table", "json", "yaml")


def gpu_dict(gpu: gpud_pb2.Gpu) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "pci_bus_id": gpu.pci_bus_id,
        "pci_device_id": gpu.pci_device_id,
        "memory_mib": gpu.memory_mib,
        "minor_number": gpu.minor_number,
        "numa_node": None if gpu.numa_node < 0 else gpu.numa_node,
        "health": gpu.health,
        "health_reason": gpu.health_reason,
        "mig_mode": gpu.mig_mode,
        "nvlink_peers": list(gpu.nvlink_peers),
    }


def status_dict(st: gpud_pb2.Status) -> dict[str, Any]:
    return {
        "version": st.version,
        "backend": st.backend,
        "backend_error": st.backend_error,
        "driver_version": st.driver_version,
        "cuda_version": st.cuda_version,
        "config_file": st.config_file,
        "kubelet_dir": st.kubelet_dir,
        "kubelet_connected": st.kubelet_connected,
        "uptime_s": round(st.uptime_s, 1),
        "resource_error": st.resource_error,
        "gpus": [gpu_dict(g) for g in st.gpus],
        "plugins": [
            {
                "resource": p.resource,
                "socket": p.socket,
                "registered": p.registered,
                "devices": p.devices,
                "healthy": p.healthy,
                "error": p.error,
            }
            for p in st.plugins
        ],
        "publishers": [publisher_dict(p) for p in st.publishers],
        "allocation_mode": st.allocation_mode,
        "dra_driver": st.dra_driver,
    }


def _iso(unix: float) -> str | None:
    """RFC 3339 UTC for a Unix time, None for 0 (not set)."""
    if not unix:
        return None
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


def publisher_dict(p: gpud_pb2.Publisher) -> dict[str, Any]:
    return {
        "name": p.name,
        "state": p.state,
        "since": _iso(p.since_unix),
        "error": p.error,
        "failures": p.failures,
        "next_retry": _iso(p.retry_at_unix),
        "detail": p.detail,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def gpu_table(gpus: Sequence[dict[str, Any]]) -> str:
    if not gpus:
        return "no GPUs"
    return table(
        ["GPU", "UUID", "NAME", "MEMORY", "NUMA", "MIG", "HEALTH"],
        [
            [
                g["index"],
                g["uuid"],
                g["name"],
                f"{g['memory_mib']} MiB",
                g["numa_node"],
                g["mig_mode"],
                g["health"] + (f" ({g['health_reason']})" if g["health_reason"] else ""),
            ]
            for g in gpus
        ],
    )


def status_table(st: dict[str, Any]) -> str:
    lines = [f"gpud {st['version']}, backend {st['backend']}, up {st['uptime_s']:.0f}s"]
    if st["backend_error"]:
        lines.append(f"backend error: {st['backend_error']}")
    else:
        lines.append(f"driver {st['driver_version']}, CUDA {st['cuda_version']}")
    kubelet = "kubelet.sock present" if st["kubelet_connected"] else "no kubelet.sock"
    lines.append(f"kubelet: {st['kubelet_dir']} ({kubelet})")
    lines.append(f"config: {st['config_file'] or 'built-in defaults'}")
    if st["resource_error"]:
        lines.append(f"cannot advertise as configured: {st['resource_error']}")
    lines += ["", gpu_table(st["gpus"]), ""]
    if st["plugins"]:
        lines.append(
            table(
                ["RESOURCE", "SOCKET", "REGISTERED", "DEVICES", "HEALTHY", "ERROR"],
                [
                    [
                        p["resource"],
                        p["socket"],
                        "yes" if p["registered"] else "no",
                        p["devices"],
                        p["healthy"],
                        p["error"] or "",
                    ]
                    for p in st["plugins"]
                ],
            )
        )
    elif st["allocation_mode"] == "dra":
        lines.append(
            f"allocation: DRA, driver {st['dra_driver']} (no device plugins; see the dra publisher)"
        )
    else:
        lines.append("no device plugins running")
    if st["publishers"]:
        lines += ["", publisher_table(st["publishers"])]
    return "\n".join(lines)


def _ago(iso: str | None, now: float) -> str:
    if iso is None:
        return "-"
    seconds = max(0, round(now - datetime.fromisoformat(iso).timestamp()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def publisher_table(publishers: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """One line per audience of the node state; a degraded one says why and when it retries."""
    now = time.time() if now is None else now
    rows = []
    for p in publishers:
        state = p["state"]
        if p["error"]:
            notes = [f"{p['failures']} failed"] if p["failures"] else []
            if p["next_retry"] is not None:
                due = max(0, round(datetime.fromisoformat(p["next_retry"]).timestamp() - now))
                notes.append(f"retry in {due}s")
            state += (f" ({', '.join(notes)})" if notes else "") + f": {p['error']}"
        rows.append([p["name"], _ago(p["since"], now), p["detail"], state])
    return table(["PUBLISHER", "SINCE", "DETAIL", "STATE"], rows)


def render(data: object, fmt: str, as_table: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False).rstrip()
    return as_table


def step_dict(step: gpud_pb2.MigStep) -> dict[str, Any]:
    return {
        "action": step.action,
        "gpu": step.gpu,
        "detail": step.detail,
        "profile": step.profile,
        "placement": step.placement,
        "gi_id": None if step.gi_id < 0 else step.gi_id,
        "ci_id": None if step.ci_id < 0 else step.ci_id,
    }


def apply_dict(reply: gpud_pb2.ApplyMigLayoutResponse) -> dict[str, Any]:
    return {
        "result": reply.result,
        "mutations": reply.mutations,
        "plan": [step_dict(s) for s in reply.plan],
        "message": reply.message,
        "error_kind": reply.error_kind,
        "in_use_by": list(reply.in_use_by),
    }


def apply_table(data: dict[str, Any]) -> str:
    lines = [f"{data['result']}: {data['mutations']} NVML mutations"]
    if data["message"] and data["result"] != "failed":
        lines.append(data["message"])
    if data["plan"]:
        verb = "plan" if data["result"] in ("planned", "failed") else "steps"
        lines.append(f"{verb}:")
        lines += [f"  GPU {s['gpu']}: {s['detail']}" for s in data["plan"]]
    lines += [f"  in use: {who}" for who in data["in_use_by"]]
    return "\n".join(lines)


def mig_dict(state: gpud_pb2.MigStateResponse) -> dict[str, Any]:
    return {
        "selected_config": state.selected_config,
        "selected_source": state.selected_source,
        "selected_origin": state.selected_origin,
        "label": state.label,
        "mig_strategy": state.mig_strategy,
        "last_apply": state.last_apply,
        "last_error": state.last_error,
        "lock_longest_held_s": round(state.lock_longest_held_s, 3),
        "lock_longest_held_by": state.lock_longest_held_by,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "mode": g.mode,
                "instances": [
                    {
                        "gi_id": i.gi_id,
                        "ci_id": i.ci_id,
                        "profile": i.profile,
                        "placement": i.placement,
                        "mig_uuid": i.mig_uuid,
                    }
                    for i in g.instances
                ],
            }
            for g in state.gpus
        ],
    }


def mig_table(data: dict[str, Any]) -> str:
    selected = data["selected_config"] or "none"
    chosen = f"chosen by {data['selected_origin']}, " if data["selected_origin"] else ""
    lines = [
        f"layout: {selected} ({chosen}from {data['selected_source'] or '-'}), "
        f"strategy {data['mig_strategy']}"
    ]
    if data["label"]:
        lines.append(
            f"managed by the Node label nvidia.com/mig.config={data['label']}: "
            "gpudctl mig apply is refused while it is set"
        )
    if data["last_apply"]:
        last = f"last apply: {data['last_apply']}"
        lines.append(last + (f" ({data['last_error']})" if data["last_error"] else ""))
    rows = []
    for g in data["gpus"]:
        if not g["instances"]:
            rows.append([g["index"], g["mode"], "", "", "", ""])
        for i in g["instances"]:
            rows.append(
                [
                    g["index"],
                    g["mode"],
                    i["profile"],
                    f"{i['gi_id']}/{i['ci_id']}",
                    i["placement"],
                    i["mig_uuid"],
                ]
            )
    lines += ["", table(["GPU", "MIG", "PROFILE", "GI/CI", "PLACEMENT", "MIG UUID"], rows)]
    return "\n".join(lines)


def labels_dict(reply: gpud_pb2.GetLabelsResponse) -> dict[str, Any]:
    """``gpudctl labels -o json``: exactly ``labels`` and ``nfd_file`` (null when no file is
    written), the contract scripts read."""
    return {
        "labels": dict(sorted(reply.labels.items())),
        "nfd_file": reply.nfd_file or None,
    }


def labels_text(data: dict[str, Any], detail: str) -> str:
    """``name=value`` lines as the feature file has them, then where they are published."""
    lines = [f"{name}={value}" for name, value in data["labels"].items()]
    if not lines:
        lines.append("no labels")
    lines += ["", f"NFD feature file: {data['nfd_file'] or 'none'}"]
    if detail:
        lines.append(detail)
    return "\n".join(lines)
