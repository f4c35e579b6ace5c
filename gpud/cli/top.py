"""``gpudctl top``: every GPU and MIG device, its load, and the pods holding it, refreshed in place.

The first question on a busy node is "which pod is on that GPU", which nvidia-smi cannot answer:
it sees processes, not pods. gpud reads kubelet's PodResources for its metrics anyway, so ``top``
asks the daemon (``ReadDevices``) and shows both on one line per device, every sharing pod of a
time-sliced GPU on a line of its own.

The data form (``-o json``) is the contract for scripts; the table is derived from it. Without
``--once`` the command keeps refreshing until interrupted, and a gpud that restarts meanwhile is
shown as an error line until it answers again rather than ending the view.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from gpud._proto.gpud.v1 import gpud_pb2
from gpud.cli.output import render, table

# Home the cursor and clear the screen: the frame replaces the previous one in place.
CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def device_dict(d: gpud_pb2.DeviceReading) -> dict[str, Any]:
    utilization = _opt(d, "utilization_pct")
    power = _opt(d, "power_w")
    return {
        "gpu": d.gpu,
        "uuid": d.uuid,
        "mig_uuid": _opt(d, "mig_uuid"),
        "profile": _opt(d, "profile"),
        "utilization": None if utilization is None else round(utilization, 1),
        "memory_used_mib": _opt(d, "memory_used_mib"),
        "memory_total_mib": _opt(d, "memory_total_mib"),
        "temperature_c": _opt(d, "temperature_c"),
        "power_w": None if power is None else round(power, 1),
        "health": d.health,
        "pods": [
            {"namespace": p.namespace, "pod": p.pod, "container": p.container} for p in d.pods
        ],
    }


def top_dict(reply: gpud_pb2.DevicesReading) -> dict[str, Any]:
    return {
        "devices": [device_dict(d) for d in reply.devices],
        "pods_error": reply.pods_error or None,
        "backend_error": reply.backend_error or None,
    }


def _number(value: float | None, unit: str) -> str | None:
    return None if value is None else f"{value:.0f}{unit}"


def _memory(device: dict[str, Any]) -> str | None:
    used, total = device["memory_used_mib"], device["memory_total_mib"]
    if used is None and total is None:
        return None
    return f"{'-' if used is None else used}/{'-' if total is None else total} MiB"


def top_table(data: dict[str, Any]) -> str:
    """One line per device; each further pod of a shared device on a line of its own below."""
    rows: list[list[object]] = []
    for d in data["devices"]:
        pods = [f"{p['namespace']}/{p['pod']}/{p['container']}" for p in d["pods"]] or [None]
        mig = None if d["profile"] is None else f"{d['profile']}"
        rows.append(
            [
                d["gpu"],
                mig,
                _number(d["utilization"], "%"),
                _memory(d),
                _number(d["temperature_c"], "C"),
                _number(d["power_w"], "W"),
                d["health"],
                pods[0],
            ]
        )
        rows.extend(["", "", "", "", "", "", "", pod] for pod in pods[1:])
    lines = [table(("GPU", "MIG", "UTIL", "MEMORY", "TEMP", "POWER", "HEALTH", "POD"), rows)]
    if data["backend_error"]:
        lines.append(f"no GPU values: {data['backend_error']}")
    if data["pods_error"]:
        lines.append(f"pods unknown: {data['pods_error']}")
    return "\n".join(lines)


def frame(data: dict[str, Any], fmt: str, now: float, interval: float | None) -> str:
    """One refresh: json/yaml documents as they are (json on one line per refresh, so a stream
    is JSON lines), a table under a heading that says when and how often."""
    if fmt == "json":
        return json.dumps(data) if interval is not None else render(data, fmt, "")
    if fmt == "yaml":
        return ("---\n" if interval is not None else "") + render(data, fmt, "")
    stamp = datetime.fromtimestamp(now).strftime("%H:%M:%S")
    every = "" if interval is None else f", every {interval:g} s (Ctrl-C quits)"
    return f"gpud top at {stamp}{every}\n\n{top_table(data)}"


def run_top(
    read: Callable[[], gpud_pb2.DevicesReading],
    failure: type[Exception],
    args: argparse.Namespace,
    fmt: str,
    out: TextIO = sys.stdout,
) -> int:
    """Show one frame (``--once``) or refresh until interrupted (Ctrl-C is the way out, exit 0).
    The first read's ``failure`` ends the command (gpud is not there); a later one is shown and
    retried at the next refresh."""
    try:
        data = top_dict(read())
        if args.once:
            print(frame(data, fmt, time.time(), None), file=out)
            return 0
        _refresh(data, read, failure, args.interval, fmt, out)
    except KeyboardInterrupt:
        pass
    return 0


def _refresh(
    data: dict[str, Any],
    read: Callable[[], gpud_pb2.DevicesReading],
    failure: type[Exception],
    interval: float,
    fmt: str,
    out: TextIO,
) -> None:
    in_place = fmt == "table" and out.isatty()
    if in_place:
        out.write(HIDE_CURSOR)
    try:
        while True:
            text = frame(data, fmt, time.time(), interval)
            if in_place:
                out.write(CLEAR + text + "\n")
            else:
                out.write(text + ("\n" if fmt != "table" else "\n\n"))
            out.flush()
            time.sleep(interval)
            try:
                data = top_dict(read())
            except failure as exc:
                answer = gpud_pb2.DevicesReading(backend_error=f"gpud did not answer: {exc}")
                data = top_dict(answer)
    finally:
        if in_place:
            out.write(SHOW_CURSOR)
            out.flush()
