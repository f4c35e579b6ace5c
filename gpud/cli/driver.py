"""``gpudctl driver install``: runs in the gpudctl process itself, as root, no daemon needed.

Exit 0 when the driver is in place — installed now, already there, or installed and waiting for
a reboot or for the operator to enroll DKMS's key (``reboot_required``/``mok_enrollment_required``
true in the output: the exit status cannot say "do a reboot next", the result field does) — and
for ``--dry-run``; 1 when refused or failed, with the fix on stderr; 2 for an unusable
``--branch`` or ``--lock-timeout``. While gpud waits for the dpkg lock, who holds it goes to
stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gpud.cli.hostinfo import host_root
from gpud.cli.validate import EXIT_FAILED, EXIT_INVALID, EXIT_OK


def driver_install_command(args: argparse.Namespace, fmt: str) -> int:
    from gpud.cli.output import render
    from gpud.host.driver_install import install_driver, parse_wanted
    from gpud.host.locks import DEFAULT_TIMEOUT

    try:
        wanted = parse_wanted(args.branch) if args.branch else None
    except ValueError as exc:
        print(f"gpudctl: {exc}", file=sys.stderr)
        return EXIT_INVALID
    lock_timeout = DEFAULT_TIMEOUT if args.lock_timeout is None else args.lock_timeout
    if lock_timeout < 0:
        print("gpudctl: --lock-timeout must be 0 or more seconds", file=sys.stderr)
        return EXIT_INVALID
    if not args.dry_run and os.geteuid() != 0:
        print(
            "gpudctl: driver install must run as root: run as root (sudo gpudctl driver install),"
            " or see the plan with --dry-run",
            file=sys.stderr,
        )
        return EXIT_FAILED
    result = install_driver(
        host_root(),
        wanted,
        include_dkms=args.include_dkms,
        dry_run=args.dry_run,
        lock_timeout=lock_timeout,
        progress=lambda line: print(f"gpudctl: {line}", file=sys.stderr, flush=True),
    )
    data = result.as_dict()
    print(render(data, fmt, install_table(data)))
    if not result.ok:
        print(f"gpudctl: driver install: {result.message}", file=sys.stderr)
        if result.output_tail:
            print(result.output_tail, file=sys.stderr)
        if result.fix:
            print(f"fix: {result.fix}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def install_table(d: dict[str, Any]) -> str:
    lines = [f"{d['result']}: {d['message']}"]
    if d["requested_branch"] or d["installed_branch"]:
        lines.append(
            f"requested {d['requested_branch'] or '-'}, installed {d['installed_branch'] or '-'}"
        )
    if d["commands"]:
        lines.append("would run:" if d["result"] == "dry-run" else "ran:")
        lines += [f"  {c}" for c in d["commands"]]
    if d["mok_enrollment_required"]:
        lines.append("Secure Boot: enroll DKMS's signing key (MOK) before the driver can load:")
        lines += [f"  {i}. {step}" for i, step in enumerate(d["mok_steps"], 1)]
    elif d["reboot_required"]:
        lines.append("reboot required:")
        lines += [f"  {r}" for r in d["reboot_reasons"]]
    lines += [f"note: {n}" for n in d["notes"]]
    if d["state_file"]:
        lines.append(f"recorded in {d['state_file']}")
    return "\n".join(lines)
