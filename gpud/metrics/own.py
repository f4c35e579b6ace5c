"""gpud's own series (``gpud_*``): what it did since it started and how its devices stand.

Pure, from the snapshot and the counters (:class:`gpud.node.stats.StatsSnapshot`). Counters end in
``_total`` and carry their unit in the name, as Prometheus' naming rules ask; a resource, XID or
result that never happened has no series (Prometheus reads a missing counter as 0 once it appears).
"""

from __future__ import annotations

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpud.node.state import NodeState
from gpud.node.stats import StatsSnapshot


def own_families(state: NodeState, stats: StatsSnapshot) -> list[Metric]:
    build = GaugeMetricFamily(
        "gpud_build_info",
        "gpud's version, its hardware backend and the NVIDIA driver; always 1.",
        labels=["version", "backend", "driver_version"],
    )
    build.add_metric([state.version, state.system.backend, state.system.driver_version], 1)

    registrations = CounterMetricFamily(
        "gpud_plugin_registrations",
        "Successful registrations of a device-plugin resource with kubelet.",
        labels=["resource"],
    )
    reregistrations = CounterMetricFamily(
        "gpud_plugin_reregistrations",
        "Registrations after the first (kubelet restarted or forgot the plugin).",
        labels=["resource"],
    )
    calls = CounterMetricFamily(
        "gpud_allocate_calls", "Allocate calls from kubelet.", labels=["resource"]
    )
    errors = CounterMetricFamily(
        "gpud_allocate_errors",
        "Allocate calls answered with an error (unknown or unhealthy devices, too many).",
        labels=["resource"],
    )
    for name, counts in sorted(stats.resources.items()):
        registrations.add_metric([name], counts.registrations)
        reregistrations.add_metric([name], counts.reregistrations)
        calls.add_metric([name], counts.allocate_calls)
        errors.add_metric([name], counts.allocate_errors)

    device_labels = ["gpu", "gpu_uuid", "uuid", "profile"]
    healthy = GaugeMetricFamily(
        "gpud_device_healthy",
        "1 when the GPU or MIG device is in service, 0 when gpud took it out (gpudctl status "
        "says why).",
        labels=device_labels,
    )
    withdrawn = GaugeMetricFamily(
        "gpud_device_withdrawn",
        "1 while the device is withdrawn from kubelet for a MIG layout change.",
        labels=device_labels,
    )
    for device in state.devices:
        labels = [str(device.gpu_index), device.gpu_uuid, device.uuid, device.profile or ""]
        healthy.add_metric(labels, int(device.healthy))
        withdrawn.add_metric(labels, int(device.withdrawn))

    index = {g.uuid: str(g.index) for g in state.gpus}
    xids = CounterMetricFamily(
        "gpud_xid_events",
        "XID events reported by the driver, by GPU and XID (critical or not).",
        labels=["gpu", "gpu_uuid", "xid"],
    )
    for (uuid, xid), count in sorted(stats.xids.items()):
        xids.add_metric([index.get(uuid, ""), uuid, str(xid)], count)

    applies = CounterMetricFamily(
        "gpud_mig_applies",
        "MIG layout applies by result: applied, unchanged, planned, failed, refused, invalid.",
        labels=["result"],
    )
    seconds = CounterMetricFamily(
        "gpud_mig_apply_seconds",
        "Wall time spent in MIG layout applies, by result.",
        labels=["result"],
    )
    mutations = CounterMetricFamily(
        "gpud_mig_apply_mutations",
        "NVML calls that changed MIG state (mode, instances) during applies, by result.",
        labels=["result"],
    )
    for result, mig in sorted(stats.mig_applies.items()):
        applies.add_metric([result], mig.count)
        seconds.add_metric([result], mig.seconds)
        mutations.add_metric([result], mig.mutations)

    reloads = CounterMetricFamily(
        "gpud_config_reloads",
        "Configuration reloads (SIGHUP, gpudctl) by result.",
        labels=["result"],
    )
    for result, count in sorted(stats.config_reloads.items()):
        reloads.add_metric([result], count)

    return [
        build,
        registrations,
        reregistrations,
        calls,
        errors,
        healthy,
        withdrawn,
        xids,
        applies,
        seconds,
        mutations,
        reloads,
    ]
