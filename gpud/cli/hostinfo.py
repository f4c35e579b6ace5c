"""``gpudctl platform`` and ``gpudctl driver status``: host facts, read in gpudctl's own process.

No daemon is needed: both read the node directly, as any user (what needs root is said in the
notes). ``GPUD_ROOT`` points them at another root directory — a chroot, an image being built, or a
test's fake tree; it is not meant for day-to-day use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from gpud.cli.validate import EXIT_FAILED, EXIT_OK


def host_root() -> Path:
    """``/`` unless ``GPUD_ROOT`` says otherwise (chroots and tests)."""
    return Path(os.environ.get("GPUD_ROOT") or "/")


def platform_table(d: dict[str, Any]) -> str:
    from gpud.cli.output import table

    osr = d["os"]
    ctr = d["containerd"]
    active = {True: "active", False: "not active", None: "unknown"}[ctr["active"]]
    rows = [
        ["os", f"{osr['id']} {osr['version']} ({osr['codename'] or '-'})"],
        ["flavour", d["flavour"]],
        ["containerd config", ctr["config"]],
        ["containerd socket", ctr["socket"]],
        ["containerd service", f"{ctr['service']} ({active})"],
        ["restart with", " ".join(ctr["restart"])],
        ["kubelet", d["kubelet"]["flavour"]],
        ["device plugins", d["kubelet"]["device_plugin_dir"]],
        ["pod resources", d["kubelet"]["pod_resources_socket"]],
    ]
    lines = [table(["WHAT", "WHERE"], rows), "", f"note: {ctr['config_note']}", "found:"]
    lines += [f"  {r}" for r in d["reasons"]]
    return "\n".join(lines)


def driver_table(d: dict[str, Any]) -> str:
    from gpud.cli.output import table

    def yn(v: bool) -> str:
        return "yes" if v else "no"

    module = f"loaded, {d['loaded_version'] or '?'}" if d["module_loaded"] else "not loaded"
    branch = "-"
    if d["branch"]:
        flags = [f for f, on in (("server", d["server"]), ("open", d["open"])) if on]
        branch = d["branch"] + (f" ({', '.join(flags)})" if flags else "")
    if d["signed_prebuilt"]:
        modules = "signed prebuilt"
    elif d["dkms"]:
        modules = "DKMS"
    else:
        modules = "none for this kernel"
    rows = [
        ["kernel module", module],
        ["installed", f"{branch}, {d['installed_version'] or '?'}" if d["branch"] else "nothing"],
        ["modules", f"{modules} (kernel {d['kernel'] or '?'})"],
        [
            "nouveau",
            f"loaded {yn(d['nouveau_loaded'])}, blacklisted {yn(d['nouveau_blacklisted'])}",
        ],
        ["secure boot", d["secure_boot"]],
        ["persistenced", d["persistenced"]],
        [
            "reboot required",
            "yes: " + "; ".join(d["reboot_reasons"]) if d["reboot_required"] else "no",
        ],
    ]
    if d["nvml_version"]:
        rows.insert(1, ["NVML", d["nvml_version"]])
    lines = [table(["WHAT", "STATE"], rows)]
    if d["packages"]:
        lines += [
            "",
            table(
                ["PACKAGE", "VERSION", "STATUS"],
                [[p["name"], p["version"], p["status"]] for p in d["packages"]],
            ),
        ]
    if d["problems"]:
        lines += ["", "problems:"]
        lines += [f"  {p['what']}\n    fix: {p['fix']}" for p in d["problems"]]
    else:
        lines += ["", "no problems"]
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)


def platform_command(fmt: str) -> int:
    from gpud.cli.output import render
    from gpud.host.platform import discover

    data = discover(host_root()).as_dict()
    print(render(data, fmt, platform_table(data)))
    return EXIT_OK


def driver_status_command(fmt: str) -> int:
    """Exit 0 when the driver has no problem, 1 when it has (like ``gpudctl doctor``)."""
    from gpud.cli.output import render
    from gpud.host.driver import driver_status

    data = driver_status(host_root()).as_dict()
    print(render(data, fmt, driver_table(data)))
    if fmt != "table":  # the table already lists them; scripts reading stdout get a hint here
        for p in data["problems"]:
            print(f"gpudctl: driver: {p['what']}; fix: {p['fix']}", file=sys.stderr)
    return EXIT_FAILED if data["problems"] else EXIT_OK
