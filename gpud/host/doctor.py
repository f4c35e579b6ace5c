"""``gpudctl doctor``: every host and daemon check in one report, with a fix for each failing line.

A node that does not schedule GPU pods can be wrong at any of a dozen layers (no driver, module
not loaded, no toolkit, containerd not configured, stale CDI spec, gpud down, GPU marked
Unhealthy, plugin not registered with the kubelet), and each layer already has its own status
command. An operator should not need to know which to run first, so doctor runs them all and
says, line by line, what is fine, what is not, and what to type about it.

The judgement (:func:`diagnose`) is a pure function of the facts the existing collectors return
(platform discovery, driver status, toolkit status) plus a read-only view of the daemon's
``GetStatus``, so every failure path is testable with hand-built inputs. :func:`collect` is the
thin effectful half: it reads the node and asks the daemon with a short timeout. Nothing here
needs root or changes anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.host.cdi import KIND, spec_problems
from gpud.host.commands import CommandRunner, run_command
from gpud.host.conflicts import FINISH_INSTALL, Conflict, describe, find_conflicts, fix_steps
from gpud.host.driver import DriverStatus
from gpud.host.platform import NONE, Platform
from gpud.host.toolkit_install import ToolkitStatus

PLATFORM, BOOTSTRAP, DRIVER, TOOLKIT, CDI, DAEMON, GPUS, KUBELET, PLUGINS = (
    "platform",
    "bootstrap",
    "driver",
    "toolkit",
    "cdi",
    "daemon",
    "gpus",
    "kubelet",
    "plugins",
)
CLUSTER = "cluster"
AREAS = (PLATFORM, BOOTSTRAP, DRIVER, TOOLKIT, CDI, DAEMON, GPUS, KUBELET, PLUGINS, CLUSTER)

START_GPUD = "sudo systemctl start gpud (without systemd: sudo gpud run)"
_REMOVE_OTHER = "remove the other gpud first: the other gpud line above says how"
_CDI_FIX = "sudo gpudctl toolkit cdi"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
class Check:
    """One line of the report. ``ok`` is None when it could not be known (not a failure)."""

    area: str
    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """True unless some check failed; unknown lines do not count against the node."""
        return all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.ok is False)

    def as_dict(self) -> dict[str, Any]:
        """The stable form of ``gpudctl doctor -o json``: ``{ok, checks: [{area, name, ok,
        detail, fix}]}``; ``ok`` of a check is true, false or null (unknown)."""
        return {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}


@dataclass(frozen=True)
class GpuView:
    index: int
    uuid: str
    health: str
    health_reason: str = ""


@dataclass(frozen=True)
class PluginView:
    resource: str
    registered: bool
    devices: int = 0
    healthy: int = 0
    error: str = ""


@dataclass(frozen=True)
class DaemonView:
    """What doctor needs from the daemon's ``GetStatus``; plain data, so tests need no daemon."""

    socket: str
    version: str = ""
    backend: str = ""
    backend_error: str = ""
    driver_version: str = ""
    kubelet_dir: str = ""
    kubelet_connected: bool = False
    resource_error: str = ""
    gpus: tuple[GpuView, ...] = field(default=())
    plugins: tuple[PluginView, ...] = field(default=())
    # The publishers' status rows (gpudctl status -o json's "publishers").
    publishers: tuple[dict[str, Any], ...] = field(default=())

    @classmethod
    def from_status(cls, socket: str, st: dict[str, Any]) -> DaemonView:
        """From :func:`gpud.cli.output.status_dict`'s form (the ``gpudctl status -o json`` data)."""
        return cls(
            socket=socket,
            version=st.get("version", ""),
            backend=st.get("backend", ""),
            backend_error=st.get("backend_error", ""),
            driver_version=st.get("driver_version", ""),
            kubelet_dir=st.get("kubelet_dir", ""),
            kubelet_connected=bool(st.get("kubelet_connected")),
            resource_error=st.get("resource_error", ""),
            gpus=tuple(
                GpuView(g["index"], g["uuid"], g["health"], g.get("health_reason", ""))
                for g in st.get("gpus", ())
            ),
            plugins=tuple(
                PluginView(
                    p["resource"],
                    bool(p["registered"]),
                    p.get("devices", 0),
                    p.get("healthy", 0),
                    p.get("error", ""),
                )
                for p in st.get("plugins", ())
            ),
            publishers=tuple(st.get("publishers", ())),
        )


@dataclass(frozen=True)
class BootstrapView:
    """gpud bootstrap's state file as doctor needs it, and whether a bootstrap runs now."""

    phase: str | None
    """None when bootstrap never ran here (no state file)."""
    step: str | None = None
    time: str = ""
    pid: int | None = None
    running: bool | None = None
    """A bootstrap holds the run lock now; None when that cannot be known."""
    failed_step: str | None = None
    detail: str = ""
    fix: str = ""
    armed: bool = False
    """The resume unit's marker is there."""
    rebooted: bool | None = None
    """The node booted since the unit was armed."""


# --- judgement (pure) ---------------------------------------------------------------------------


def _bootstrap(b: BootstrapView | None) -> list[Check]:
    """One line for the setup: done, waiting (for what), failed (why), or cut off."""
    from gpud.host import bootstrap as bs

    if b is None or b.phase is None:
        return [Check(BOOTSTRAP, "state", True, "gpud bootstrap has not run on this node")]
    when = f" (at {b.time})" if b.time else ""
    pid = f"pid {b.pid}" if b.pid else "pid not recorded"
    resume = f"systemctl status {bs.RESUME_UNIT_NAME} (journalctl -u {bs.RESUME_UNIT_NAME} -b)"
    if b.phase == bs.RUNNING:
        if b.running is None:
            return [Check(BOOTSTRAP, "state", None, f"running step {b.step}{when}, or cut off")]
        if b.running:
            return [Check(BOOTSTRAP, "state", None, f"running step {b.step}, {pid}{when}")]
        return [
            Check(
                BOOTSTRAP,
                "state",
                False,
                f"stale: bootstrap.json says running step {b.step}{when}, but its process "
                f"({pid}) is gone: it was cut off (killed, or the node went down)",
                "sudo gpud bootstrap: every step checks first, so it goes on where this one "
                "stopped",
            )
        ]
    if b.phase == bs.PHASE_DONE:
        return [Check(BOOTSTRAP, "state", True, f"done{when}")]
    if b.phase == bs.AWAITING_REBOOT:
        if b.rebooted:
            return [
                Check(
                    BOOTSTRAP,
                    "state",
                    False,
                    f"the node rebooted, but the resume after the reboot did not run{when}",
                    f"{resume}; or sudo gpud bootstrap",
                )
            ]
        return [
            Check(
                BOOTSTRAP,
                "state",
                False,
                f"waiting for the reboot it asked for{when}",
                f"sudo systemctl reboot; {bs.RESUME_UNIT_NAME} finishes the setup",
            )
        ]
    if b.phase == bs.AWAITING_MOK:
        return [
            Check(
                BOOTSTRAP,
                "state",
                False,
                f"stopped at step driver{when}: Secure Boot loads the driver only after DKMS's "
                "key is enrolled at the console",
                b.fix or "sudo gpudctl driver status lists the steps",
            )
        ]
    retry = f"; {bs.RESUME_UNIT_NAME} tries again at the next boot" if b.armed else ""
    fix = f"{b.fix}; then sudo gpud bootstrap" if b.fix else "sudo gpud bootstrap"
    detail = b.detail.splitlines()[0] if b.detail else ""
    return [
        Check(
            BOOTSTRAP,
            "state",
            False,
            f"step {b.failed_step or b.step} failed{when}: {detail}".rstrip(": "),
            fix + retry,
        )
    ]


def _platform(p: Platform, t: ToolkitStatus) -> list[Check]:
    out = []
    if p.flavour == NONE:
        out.append(
            Check(
                PLATFORM,
                "flavour",
                False,
                "no MicroK8s, k3s, kubeadm or containerd found",
                "install Kubernetes (e.g. sudo snap install microk8s --classic) or containerd",
            )
        )
    else:
        os_name = f"{p.os_id} {p.os_version}".strip()
        out.append(Check(PLATFORM, "flavour", True, f"{p.flavour} on {os_name}"))
    if t.config_exists:
        out.append(Check(PLATFORM, "containerd config", True, f"{p.containerd_config} exists"))
    else:
        fix = (
            "start containerd once so it writes its config "
            f"({' '.join(p.restart_command)}), then sudo gpudctl toolkit configure"
            if p.flavour != NONE
            else "install containerd, then sudo gpudctl toolkit configure"
        )
        missing = f"{p.containerd_config} does not exist"
        out.append(Check(PLATFORM, "containerd config", False, missing, fix))
    return out


_DRIVER_NAMES = (
    ("nouveau", "nouveau"),
    ("Secure Boot", "secure boot"),
    ("persistenced", "persistenced"),
    ("running module is", "version"),
    ("module", "module"),
    ("package", "packages"),
    ("branch", "packages"),
)


def _driver_name(what: str) -> str:
    return next((name for key, name in _DRIVER_NAMES if key in what), "driver")


def _driver(d: DriverStatus) -> list[Check]:
    f = d.facts
    out = [Check(DRIVER, _driver_name(p.what), False, p.what, p.fix) for p in d.problems]
    if not d.problems:
        version = f.loaded_version or d.branch.installed_version or "?"
        out.append(Check(DRIVER, "driver", True, f"driver {version} loaded"))
    if f.secure_boot == "unknown":
        why = next((n for n in f.notes if n.startswith("Secure Boot")), "Secure Boot state unknown")
        out.append(Check(DRIVER, "secure boot", None, why))
    return out


def _is_cdi(problem_fix: str) -> bool:
    return problem_fix == _CDI_FIX


def _toolkit(t: ToolkitStatus) -> list[Check]:
    out = []
    missing_config = f"{t.config} does not exist"
    for p in t.problems:
        # The missing containerd config is the platform's line; spec problems are CDI's.
        if p.message == missing_config or _is_cdi(p.fix):
            continue
        name = "package" if "installed" in p.message else "runtime"
        out.append(Check(TOOLKIT, name, False, p.message, p.fix))
    if t.version is not None:
        out.append(Check(TOOLKIT, "package", True, f"nvidia-container-toolkit {t.version}"))
    if t.runtime_configured:
        out.append(Check(TOOLKIT, "runtime", True, _runtime_detail(t)))
    return out


def _runtime_detail(t: ToolkitStatus) -> str:
    """Where containerd gets the nvidia runtime (and the default) from: the top-level config or
    a drop-in it imports, and any drop-in that overrides another."""
    eff = t.effective or {}
    source = eff.get("runtime_file") or t.config
    binary = f" ({eff['binary_name']})" if eff.get("binary_name") else ""
    detail = f"nvidia runtime{binary} in {source}"
    if t.default_runtime:
        setter = eff.get("default_runtime_file")
        detail += ", the default" + (f" (set in {setter})" if setter and setter != source else "")
    overrides = eff.get("overrides") or []
    if overrides:
        detail += "; " + "; ".join(overrides)
    return detail


def _cdi(t: ToolkitStatus, daemon: DaemonView | None) -> list[Check]:
    out = [Check(CDI, "spec", False, p.message, p.fix) for p in t.problems if _is_cdi(p.fix)]
    for path, spec in t.cdi_specs.items():
        if not spec.get("exists") or spec.get("error"):
            continue
        names = tuple(spec.get("devices") or ())
        bad = spec_problems(spec.get("kind") or "", names)
        if bad:
            out.append(Check(CDI, "spec", False, f"{path}: {'; '.join(bad)}", _CDI_FIX))
            continue
        stale = []
        if daemon is not None and any("=GPU-" in n for n in names):
            stale = [g.uuid for g in daemon.gpus if f"{KIND}={g.uuid}" not in names]
        if stale:
            out.append(
                Check(
                    CDI,
                    "spec",
                    False,
                    f"{path} does not name {', '.join(stale)} (stale: driver or GPUs changed)",
                    _CDI_FIX,
                )
            )
        else:
            out.append(Check(CDI, "spec", True, f"{path}: {len(names)} devices, {KIND}=all"))
    if not out:
        if t.cdi_enabled:
            pass  # toolkit's own "enable_cdi is on but there is no spec" problem is above
        elif t.cdi_enabled is False:
            out.append(Check(CDI, "spec", True, "enable_cdi is off in containerd: no spec needed"))
        else:
            out.append(Check(CDI, "spec", None, "no CDI spec; containerd's enable_cdi unknown"))
    return out


def _other_gpud(conflicts: tuple[Conflict, ...]) -> Check:
    """One line for all of them: the steps only work in their merged order, and the last one
    (finish the package, start ours) must come once, after all of them."""
    if not conflicts:
        return Check(DAEMON, "other gpud", True, "no other gpud shadows this one's unit or command")
    finish = (
        f"then {FINISH_INSTALL} (when the package's configuration stopped here) and "
        "sudo systemctl enable --now gpud"
    )
    fix = "; ".join((*fix_steps(conflicts), finish))
    return Check(DAEMON, "other gpud", False, describe(conflicts), fix)


def _daemon(
    daemon: DaemonView | None, error: str | None, conflicts: tuple[Conflict, ...]
) -> list[Check]:
    out = [_other_gpud(conflicts)]
    if daemon is None:
        why = error or "no answer"
        if "permission denied" in why.lower():
            out.append(
                Check(
                    DAEMON,
                    "reachable",
                    False,
                    f"cannot read gpud's socket: {why}",
                    "sudo gpudctl doctor, or join the socket's group: sudo usermod -aG gpud $USER",
                )
            )
            return out
        # Starting gpud.service while another gpud owns that name starts the other one.
        start = _REMOVE_OTHER if conflicts else START_GPUD
        out.append(Check(DAEMON, "reachable", False, f"gpud is not running ({why})", start))
        return out
    out.append(
        Check(
            DAEMON,
            "reachable",
            True,
            f"gpud {daemon.version} on {daemon.socket}, backend {daemon.backend}",
        )
    )
    if daemon.backend_error:
        out.append(
            Check(
                DAEMON,
                "backend",
                False,
                daemon.backend_error,
                "fix the driver lines above, then sudo systemctl restart gpud",
            )
        )
    if daemon.resource_error:
        out.append(
            Check(
                DAEMON,
                "resources",
                False,
                f"cannot advertise as configured: {daemon.resource_error}",
                "change gpud.yaml (migStrategy, sharing) or the MIG layout, then "
                "sudo gpudctl config reload",
            )
        )
    return out


def _gpus(daemon: DaemonView | None) -> list[Check]:
    if daemon is None:
        return [Check(GPUS, "health", None, "unknown: gpud is not running")]
    if not daemon.gpus:
        if daemon.backend_error:
            return [Check(GPUS, "health", None, "unknown: gpud's backend is not usable")]
        return [
            Check(
                GPUS,
                "health",
                False,
                "gpud sees no GPUs",
                "check nvidia-smi -L; then sudo systemctl restart gpud",
            )
        ]
    out = []
    for g in daemon.gpus:
        if g.health == UNHEALTHY:
            out.append(
                Check(
                    GPUS,
                    f"GPU {g.index}",
                    False,
                    f"{g.uuid} is Unhealthy: {g.health_reason or 'no reason given'}",
                    f"repair it (see dmesg, nvidia-smi -q), then sudo gpudctl device set-healthy "
                    f"{g.uuid}",
                )
            )
    healthy = sum(1 for g in daemon.gpus if g.health != UNHEALTHY)
    if healthy:
        out.append(Check(GPUS, "health", True, f"{healthy} of {len(daemon.gpus)} GPUs healthy"))
    return out


def _kubelet(p: Platform, daemon: DaemonView | None, sock_present: bool | None) -> list[Check]:
    detected = str(p.kubelet_device_plugin_dir)
    watched = daemon.kubelet_dir if daemon is not None and daemon.kubelet_dir else detected
    present = daemon.kubelet_connected if daemon is not None else sock_present
    if present:
        return [Check(KUBELET, "kubelet.sock", True, f"{watched}/kubelet.sock present")]
    if present is None:
        return [Check(KUBELET, "kubelet.sock", None, f"unknown: cannot look into {watched}")]
    fix = f"start the kubelet ({p.kubelet_flavour}: device plugins in {detected})"
    if watched != detected:
        fix += f", gpud watches {watched}: set paths.kubeletDir: {detected} in gpud.yaml"
    return [Check(KUBELET, "kubelet.sock", False, f"no kubelet.sock in {watched}", fix)]


def _plugins(daemon: DaemonView | None) -> list[Check]:
    if daemon is None:
        return [Check(PLUGINS, "registered", None, "unknown: gpud is not running")]
    if not daemon.plugins:
        if daemon.gpus:
            return [
                Check(
                    PLUGINS,
                    "registered",
                    False,
                    f"no device plugin is running though {len(daemon.gpus)} GPUs are present",
                    "see the resources line above and journalctl -u gpud",
                )
            ]
        return [Check(PLUGINS, "registered", None, "no device plugins (no GPUs)")]
    out = []
    for pl in daemon.plugins:
        if pl.registered:
            detail = f"registered, {pl.healthy} of {pl.devices} devices healthy"
            out.append(Check(PLUGINS, pl.resource, True, detail))
        else:
            out.append(
                Check(
                    PLUGINS,
                    pl.resource,
                    False,
                    f"not registered with the kubelet: {pl.error or 'no answer yet'}",
                    "check the kubelet line above; gpud retries on its own "
                    "(journalctl -u gpud says why it fails)",
                )
            )
    return out


def _cluster(daemon: DaemonView | None) -> list[Check]:
    """The link to the API server (gpud's labels on its Node): on, off and why, or failing."""
    if daemon is None:
        return [Check(CLUSTER, "API link", None, "unknown: gpud is not running")]
    link = next((p for p in daemon.publishers if p["name"] == "kubernetes"), None)
    if link is None:
        return [Check(CLUSTER, "API link", None, "unknown: this gpud reports no API link")]
    if link["state"] == "degraded":
        return [
            Check(
                CLUSTER,
                "API link",
                False,
                link["error"],
                "see docs/cluster.md (troubleshooting); gpud retries on its own",
            )
        ]
    return [Check(CLUSTER, "API link", True, link["detail"] or link["state"])]


def diagnose(
    platform: Platform,
    driver: DriverStatus,
    toolkit: ToolkitStatus,
    daemon: DaemonView | None,
    daemon_error: str | None,
    *,
    kubelet_sock: bool | None = None,
    conflicts: tuple[Conflict, ...] = (),
    bootstrap: BootstrapView | None = None,
) -> Report:
    """The whole report from collected facts; pure, so every failure is testable by hand.

    ``daemon`` is None when gpud could not be asked (``daemon_error`` says why); then the GPU
    and plugin lines are unknown and the kubelet line rests on ``kubelet_sock`` (whether
    ``kubelet.sock`` exists in the detected device-plugin directory, None when unknown).
    ``conflicts`` are the other gpuds :func:`gpud.host.conflicts.find_conflicts` found;
    ``bootstrap`` is gpud bootstrap's recorded state (None: it never ran).
    """
    checks = [
        *_platform(platform, toolkit),
        *_bootstrap(bootstrap),
        *_driver(driver),
        *_toolkit(toolkit),
        *_cdi(toolkit, daemon),
        *_daemon(daemon, daemon_error, conflicts),
        *_gpus(daemon),
        *_kubelet(platform, daemon, kubelet_sock),
        *_plugins(daemon),
        *_cluster(daemon),
    ]
    return Report(tuple(checks))


# --- collection (effects) -----------------------------------------------------------------------


def ask_daemon(socket: str, timeout: float = 3.0) -> tuple[DaemonView | None, str | None]:
    """``GetStatus`` over the control socket (read-only, any user in its group); never raises."""
    import grpc

    from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc
    from gpud.cli.output import status_dict

    try:
        if not Path(socket).exists():
            return None, f"no socket at {socket}"
    except PermissionError:
        pass  # a directory we may not search: connecting says "permission denied" precisely
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            reply = gpud_pb2_grpc.GpudStub(channel).GetStatus(
                gpud_pb2.GetStatusRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            details = exc.details() or exc.code().name  # type: ignore[attr-defined]
            return None, f"{socket}: {details}"
    return DaemonView.from_status(socket, status_dict(reply)), None


def _sock_present(p: Platform) -> bool | None:
    try:
        return p.resolve(p.kubelet_device_plugin_dir / "kubelet.sock").exists()
    except OSError:
        return None


def bootstrap_view(root: Path) -> BootstrapView | None:
    """gpud bootstrap's state file and run lock; None when it never ran here."""
    from gpud.host import bootstrap as bs
    from gpud.host.locks import holder_pid
    from gpud.host.platform import under

    state = bs.read_state(root)
    if not state.get("phase"):
        return None
    lock = under(root, bs.LOCK_FILE)
    running: bool | None = False
    if lock.exists():
        running = holder_pid(lock) is not None if os.access(lock, os.R_OK) else None
    failed = state.get("failed_step")
    step = state.get("steps", {}).get(failed, {}) if failed else {}
    marker = bs.read_marker(root)
    armed_boot = (marker or "").strip() or state.get("boot_id")
    boot = bs.read_boot_id(root)
    pid = state.get("pid")
    return BootstrapView(
        phase=state["phase"],
        step=state.get("step"),
        time=state.get("updated", ""),
        pid=pid if isinstance(pid, int) else None,
        running=running,
        failed_step=failed,
        detail=str(step.get("detail", "")),
        fix=str(step.get("fix", "")),
        armed=marker is not None,
        rebooted=(armed_boot != boot) if armed_boot and boot else None,
    )


def collect(
    root: Path = Path("/"), socket: str = "/run/gpud/gpud.sock", run: CommandRunner = run_command
) -> Report:
    """Read the node under ``root`` and ask gpud on ``socket``; then :func:`diagnose`."""
    from gpud.host.driver import driver_status
    from gpud.host.platform import discover
    from gpud.host.toolkit_install import toolkit_status

    daemon, error = ask_daemon(socket)
    nvml = daemon.driver_version if daemon is not None and daemon.driver_version else None
    platform = discover(root, run)
    return diagnose(
        platform,
        driver_status(root, run, nvml),
        toolkit_status(root, run),
        daemon,
        error,
        kubelet_sock=_sock_present(platform),
        conflicts=find_conflicts(root),
        bootstrap=bootstrap_view(root),
    )
