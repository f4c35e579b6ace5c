"""Re-applying gpud.service's device allow-list once the driver's device groups exist.

gpud.service allows ``DeviceAllow=char-nvidia* rwm`` under ``DevicePolicy=closed``. systemd turns a
group pattern into major numbers by matching it against ``/proc/devices`` when it builds the
unit's device filter (src/core/bpf-devices.c: one rule per matching line), which it does when the
unit starts and again whenever the unit's device settings change (and at ``daemon-reload``). A
group the driver registers after gpud started (``nvidia-frontend``, the major of
``/dev/nvidiactl`` and ``/dev/nvidia<N>``; ``nvidia-caps`` for MIG; ``nvidia-uvm``) is therefore
not in the filter, and NVML's open of ``/dev/nvidiactl`` fails inside the sandbox with EPERM.

So when the driver shows itself, gpud sets its own group entries again through systemd
(``systemctl set-property --runtime``, kept in /run only, so a reboot starts from the unit file):
the values are the same, but the change makes systemd rebuild the filter from ``/proc/devices``
as it is now, without restarting gpud. Only group entries (``char-…``, ``block-…``) are set:
entries naming a path or a major number do not depend on ``/proc/devices``, and a unit whose
drop-ins removed every entry has no allow-list to refresh (adding one would start restricting).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpud.host.commands import CommandRunner, run_command

APPLIED, SKIPPED, FAILED = "applied", "skipped", "failed"


@dataclass(frozen=True)
class PolicyResult:
    status: str
    """``applied``, ``skipped`` (not a systemd service, or no group entries) or ``failed``."""
    message: str


def own_unit(cgroup: str, invocation_id: str | None) -> str | None:
    """The systemd service this process runs as, from ``/proc/self/cgroup`` and the
    ``INVOCATION_ID`` systemd gives every service it starts; None outside a service."""
    if not invocation_id:
        return None
    for line in cgroup.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        # cgroup v2 ("0::/system.slice/gpud.service") or v1's systemd hierarchy; in a container
        # one of the two may show the host's view ("/"), so the first that names a service wins.
        if controllers in ("", "name=systemd"):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".service"):
                return name
    return None


def group_entries(show: str) -> tuple[str, ...]:
    """The ``DeviceAllow=`` entries in ``systemctl show`` output that name device groups, as
    ``"char-nvidia* rwm"``: the ones systemd resolves through ``/proc/devices``."""
    entries = []
    for line in show.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "DeviceAllow" and value.startswith(("char-", "block-")):
            entries.append(value.strip())
    return tuple(entries)


def reapply(unit: str, run: CommandRunner = run_command) -> PolicyResult:
    """Set ``unit``'s group entries again so systemd re-reads ``/proc/devices``; never raises."""
    show = run(["systemctl", "show", "--property=DeviceAllow", unit], 30.0)
    if show.returncode != 0:
        detail = show.stderr.strip() or f"exit {show.returncode}"
        return PolicyResult(FAILED, f"cannot read {unit}'s DeviceAllow: {detail}")
    entries = group_entries(show.stdout)
    if not entries:
        return PolicyResult(SKIPPED, f"{unit} allows no device groups; nothing to refresh")
    argv = ["systemctl", "set-property", "--runtime", unit]
    result = run([*argv, *(f"DeviceAllow={entry}" for entry in entries)], 30.0)
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit {result.returncode}"
        return PolicyResult(
            FAILED,
            f"cannot refresh {unit}'s device policy: {detail}; if NVML is refused, restart gpud "
            "(sudo systemctl restart gpud)",
        )
    return PolicyResult(APPLIED, f"{unit}: DeviceAllow={'; '.join(entries)} resolved again")


def reapply_own(run: CommandRunner = run_command) -> PolicyResult:
    """:func:`reapply` for the service this process is, if it is one."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text(encoding="utf-8")
    except OSError as exc:
        return PolicyResult(SKIPPED, f"cannot read /proc/self/cgroup: {exc}")
    unit = own_unit(cgroup, os.environ.get("INVOCATION_ID"))
    if unit is None:
        return PolicyResult(SKIPPED, "not running as a systemd service")
    return reapply(unit, run)
