"""``gpudctl toolkit configure``: runs in the gpudctl process itself, as root, no daemon needed.

A fresh node has no gpud running yet, and this is one of the steps that make it ready.
Exit 0 when containerd runs what was asked (changed or not), 1 when something failed (not root,
the restart, a result containerd would not load as promised: the file is then put back), 2 when
the config is not something gpud can edit safely (every file is then left untouched), the
refusal naming the file and setting that stand in the way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gpud.cli.validate import EXIT_FAILED, EXIT_INVALID, EXIT_OK


def toolkit_configure(args: argparse.Namespace, fmt: str) -> int:
    from gpud.host.containerd import ConfigError, RuntimeOptions
    from gpud.host.containerd_dump import DumpError, installed
    from gpud.host.containerd_imports import Refusal
    from gpud.host.platform import discover
    from gpud.host.toolkit import (
        VerifyError,
        command_restarter,
        configure_file,
        target_for,
    )
    from gpud.host.toolkit_install import effective_dict

    if os.geteuid() != 0:
        print("gpudctl: toolkit configure must run as root: run as root (sudo)", file=sys.stderr)
        return EXIT_FAILED
    root = _root()
    if args.config:
        target = target_for(Path(args.config))
        path, restart_argv, flavour = target.path, target.restart_argv, target.platform
    else:
        platform = discover(root)
        path = platform.resolve(platform.containerd_config)
        restart_argv, flavour = platform.restart_command, platform.flavour
    restart = None if args.no_restart else command_restarter(restart_argv)
    options = RuntimeOptions(set_as_default=args.set_as_default, enable_cdi=args.cdi)
    try:
        result = configure_file(
            path, options, restart, root=root, containerd=installed(root, flavour)
        )
    except Refusal as exc:
        print(f"gpudctl: not editing {path}: {exc}; nothing was changed", file=sys.stderr)
        return EXIT_INVALID
    except ConfigError as exc:
        print(f"gpudctl: {path}: {exc}; fix the file (it was not changed)", file=sys.stderr)
        return EXIT_INVALID
    except DumpError as exc:
        print(f"gpudctl: {exc}; fix the config first (nothing was changed)", file=sys.stderr)
        return EXIT_INVALID
    except VerifyError as exc:
        print(f"gpudctl: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"gpudctl: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED

    data: dict[str, Any] = {
        "file": str(result.path),
        "config": str(result.config or path),
        "why": result.why,
        "changed": result.changed,
        "version": result.version,
        "backup": str(result.backup) if result.backup else None,
        "removed_backups": [str(b) for b in result.removed_backups],
        "restarted": result.restarted,
        "notes": list(result.notes),
        "changes": list(result.changes),
        "judged_by": result.judged_by,
        "effective": effective_dict(result.effective) if result.effective else None,
    }
    if fmt == "json":
        print(json.dumps(data, indent=2))
    else:
        print(_table(data, " ".join(restart_argv), args.no_restart))
    if result.restart_error:
        print(
            f"gpudctl: {result.restart_error}; the config was written; "
            f"restart containerd yourself ({' '.join(restart_argv)})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _effective_lines(eff: dict[str, Any], judged_by: str) -> list[str]:
    def src(key: str) -> str:
        return f" ({eff[key]})" if eff[key] else " (containerd's default)"

    runtime = (
        f"nvidia -> {eff['binary_name']}{src('binary_name_file')}"
        if eff["nvidia_runtime"]
        else "no nvidia runtime"
    )
    if eff["enable_cdi"] is None:
        cdi = "not a setting of this containerd (1.6)"
    else:
        cdi = str(eff["enable_cdi"]).lower() + src("enable_cdi_file")
    lines = [
        f"containerd loads {', '.join(eff['files'])} [{judged_by}]",
        f"  runtime: {runtime}",
        f"  default runtime: {eff['default_runtime_name']}{src('default_runtime_file')}",
        f"  enable_cdi: {cdi}",
    ]
    lines += [f"  override: {o}" for o in eff["overrides"]]
    return lines


def _table(data: dict[str, Any], restart: str, no_restart: bool) -> str:
    if not data["changed"]:
        lines = [f"{data['file']}: already configured (version {data['version']}), nothing changed"]
    else:
        lines = [f"{data['file']}: configured (version {data['version']})"]
        if data["file"] != data["config"]:
            lines.append(f"  edited instead of {data['config']}: {data['why']}")
        lines += [f"  {change}" for change in data["changes"]]
        if data["backup"]:
            lines.append(f"backup: {data['backup']}")
        lines += [f"removed old backup: {b}" for b in data["removed_backups"]]
        if data["restarted"]:
            lines.append(f"restarted: {restart}")
        elif no_restart:
            lines.append(f"not restarted (--no-restart): run '{restart}' to apply")
    if data["effective"]:
        lines += _effective_lines(data["effective"], data["judged_by"])
    lines += [f"note: {note}" for note in data["notes"]]
    return "\n".join(lines)


def toolkit_command(args: argparse.Namespace, fmt: str) -> int:
    """Dispatch ``gpudctl toolkit <verb>``."""
    verb = args.toolkit_command
    if verb == "install":
        return toolkit_install(args, fmt)
    if verb == "status":
        return toolkit_status(fmt)
    if verb == "cdi":
        return toolkit_cdi(args, fmt)
    return toolkit_configure(args, fmt)


def _root() -> Path:
    return Path(os.environ.get("GPUD_ROOT") or "/")


def _gpud_config(path: str | None, root: Path) -> Any:
    """gpud's config for the toolkit keys: ``--gpud-config``, else /etc/gpud/gpud.yaml if any."""
    from gpud.config.load import DEFAULT_CONFIG_PATH, load
    from gpud.config.models import default_config
    from gpud.host.platform import under

    if path:
        return load(Path(path))
    default = under(root, str(DEFAULT_CONFIG_PATH))
    return load(default) if default.exists() else default_config()


def toolkit_install(args: argparse.Namespace, fmt: str) -> int:
    """Install nvidia-container-toolkit with apt when dpkg says it is missing (root); each
    apt-get waits for the dpkg lock (``--lock-timeout``, else ``apt.lockTimeout``)."""
    from gpud.config.load import ConfigError as GpudConfigError
    from gpud.host.toolkit_install import InstallError, install_toolkit

    if os.geteuid() != 0 and not args.dry_run:
        print("gpudctl: toolkit install must run as root: run as root (sudo)", file=sys.stderr)
        return EXIT_FAILED
    root = _root()
    try:
        gpud_config = _gpud_config(args.gpud_config, root)
    except GpudConfigError as exc:
        print(f"gpudctl: {exc}", file=sys.stderr)
        return EXIT_INVALID
    settings = gpud_config.toolkit
    lock_timeout = gpud_config.apt.lock_timeout if args.lock_timeout is None else args.lock_timeout
    if lock_timeout < 0:
        print("gpudctl: --lock-timeout must be 0 or more seconds", file=sys.stderr)
        return EXIT_INVALID
    os.environ.setdefault("DEBIAN_FRONTEND", "noninteractive")
    try:
        result = install_toolkit(
            root=root,
            apt_source=settings.apt_source,
            keyring=settings.keyring,
            dry_run=args.dry_run,
            lock_timeout=lock_timeout,
            progress=lambda line: print(f"gpudctl: {line}", file=sys.stderr, flush=True),
        )
    except InstallError as exc:
        fix = f"; {exc.fix}" if exc.fix else ""
        print(f"gpudctl: {exc}{fix}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"gpudctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    data = result.as_dict()
    if fmt == "json":
        print(json.dumps(data, indent=2))
    elif result.already_installed:
        print(f"{data['package']} {result.version}: already installed, nothing to do")
    elif result.dry_run:
        print(f"{data['package']} is not installed; would run: {', '.join(result.steps)}")
        if result.source:
            print(f"  {result.list_file}: {result.source}")
    else:
        print(f"{data['package']} {result.version}: installed ({', '.join(result.steps)})")
        if result.source:
            print(f"  added {result.list_file}: {result.source}")
    return EXIT_OK


def toolkit_status(fmt: str) -> int:
    """The toolkit's state on this node; exit 1 when something needs fixing."""
    from gpud.host.toolkit_install import toolkit_status as collect

    status = collect(_root())
    data = status.as_dict()
    if fmt == "json":
        print(json.dumps(data, indent=2))
    else:
        print(_status_table(data))
    return EXIT_FAILED if status.problems else EXIT_OK


def _status_table(d: dict[str, Any]) -> str:
    def yn(v: bool | None) -> str:
        return {True: "yes", False: "no", None: "-"}[v]

    pkg, ctr = d["package"], d["containerd"]
    eff = ctr["effective"] or {}

    def source(value: Any, key: str) -> str:
        if not eff or value is None:
            return ""
        return f" ({eff[key]})" if eff[key] else " (containerd's default)"

    rows = [
        ("package", f"{pkg['name']} {pkg['version'] or '(not installed)'}"),
        *((name, where or "(not found)") for name, where in d["binaries"].items()),
        (
            "containerd",
            ctr["config"]
            + ("" if ctr["exists"] else " (missing)")
            + (" (invalid)" if ctr["error"] else ""),
        ),
    ]
    if len(eff.get("files") or []) > 1:
        rows.append(("  imports", ", ".join(eff["files"][1:])))
    if ctr["judged_by"]:
        rows.append(("  judged by", ctr["judged_by"]))
    binary = f" -> {eff['binary_name']}" if eff.get("nvidia_runtime") else ""
    rows += [
        (
            "  nvidia runtime",
            yn(ctr["nvidia_runtime"]) + binary + source(binary or None, "runtime_file"),
        ),
        (
            "  default",
            yn(ctr["default_runtime"])
            + (f", {eff['default_runtime_name']}" if eff else "")
            + source(eff.get("default_runtime_name"), "default_runtime_file"),
        ),
        ("  enable_cdi", yn(ctr["enable_cdi"]) + source(eff.get("enable_cdi"), "enable_cdi_file")),
    ]
    rows += [("  override", o) for o in eff.get("overrides") or []]
    rows += [("  note", n) for n in ctr["notes"]]
    for path, spec in d["cdi"].items():
        shown = "(absent)" if not spec["exists"] else ", ".join(spec["devices"]) or "-"
        rows.append(("cdi spec", f"{path} {shown}"))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label + ':':<{width}}{value}" for label, value in rows]
    for problem in d["problems"]:
        lines.append(f"problem: {problem['message']}; fix: {problem['fix']}")
    return "\n".join(lines)


def toolkit_cdi(args: argparse.Namespace, fmt: str) -> int:
    """Generate the CDI spec with nvidia-ctk; skipped (exit 0) when nvidia-ctk is not installed."""
    from gpud.host.cdi import DEFAULT_OUTPUT, generate_spec
    from gpud.host.platform import under

    output = Path(args.output_file) if args.output_file else under(_root(), str(DEFAULT_OUTPUT))
    result = generate_spec(output=output)
    if fmt == "json":
        print(json.dumps(result.as_dict(), indent=2))
    elif result.ok:
        print(result.message)
        for name in result.devices:
            print(f"  {name}")
    if not result.ok:
        print(f"gpudctl: {result.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
