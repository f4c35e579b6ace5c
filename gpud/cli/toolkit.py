"""``gpudctl toolkit configure``: runs in the gpudctl process itself, as root, no daemon needed.

A fresh node has no gpud running yet, and this is one of the steps that make it ready.
Exit 0 when the config is right (changed or not), 1 when something failed (not root, the
restart), 2 when the config is not something gpud can edit (the file is then left untouched).
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
    from gpud.host.toolkit import command_restarter, configure_file, detect_target, target_for

    if os.geteuid() != 0:
        print("gpudctl: toolkit configure must run as root: run as root (sudo)", file=sys.stderr)
        return EXIT_FAILED
    target = detect_target(Path(os.environ.get("GPUD_ROOT", "/")))
    if args.config:
        target = target_for(Path(args.config))
    path = target.path
    restart = None if args.no_restart else command_restarter(target.restart_argv)
    options = RuntimeOptions(set_as_default=args.set_as_default, enable_cdi=args.cdi)
    try:
        result = configure_file(path, options, restart)
    except ConfigError as exc:
        print(f"gpudctl: {path}: {exc}; fix the file (it was not changed)", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"gpudctl: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED

    data: dict[str, Any] = {
        "file": str(path),
        "changed": result.changed,
        "version": result.version,
        "backup": str(result.backup) if result.backup else None,
        "restarted": result.restarted,
        "notes": list(result.notes),
        "changes": list(result.changes),
    }
    if fmt == "json":
        print(json.dumps(data, indent=2))
    else:
        print(_table(data, " ".join(target.restart_argv), args.no_restart))
    if result.restart_error:
        print(
            f"gpudctl: {result.restart_error}; the config was written; "
            f"restart containerd yourself ({' '.join(target.restart_argv)})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _table(data: dict[str, Any], restart: str, no_restart: bool) -> str:
    if not data["changed"]:
        lines = [f"{data['file']}: already configured (version {data['version']}), nothing changed"]
    else:
        lines = [f"{data['file']}: configured (version {data['version']})"]
        lines += [f"  {change}" for change in data["changes"]]
        if data["backup"]:
            lines.append(f"backup: {data['backup']}")
        if data["restarted"]:
            lines.append(f"restarted: {restart}")
        elif no_restart:
            lines.append(f"not restarted (--no-restart): run '{restart}' to apply")
    lines += [f"note: {note}" for note in data["notes"]]
    return "\n".join(lines)
