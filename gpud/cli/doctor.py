"""``gpudctl doctor``: the whole node in one report, read in gpudctl's own process.

Runs as any user and changes nothing: the host part reads files and runs the same read-only
commands as ``gpudctl driver status`` and ``gpudctl toolkit status``; the daemon part is one
``GetStatus`` on the control socket with a short timeout, so a hung or absent gpud is a failing
line rather than a hang. Exit 0 when every check passed, 1 when any failed (unknowns pass).
"""

from __future__ import annotations

from gpud.cli.validate import EXIT_FAILED, EXIT_OK
from gpud.host.doctor import Report

_MARK = {True: "OK", False: "FAIL", None: "?"}


def report_table(report: Report) -> str:
    """``OK|FAIL|?  area  name  detail`` per check, aligned, each fix indented under its line."""
    if not report.checks:
        return "no checks"
    cells = [(_MARK[c.ok], c.area, c.name) for c in report.checks]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = []
    for check, row in zip(report.checks, cells, strict=True):
        head = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        lines.append(f"{head}  {check.detail}".rstrip())
        if check.ok is False and check.fix:
            lines.append(f"{'':{widths[0]}}  fix: {check.fix}")
    failed = len(report.failures)
    lines += ["", "all checks passed" if report.ok else f"{failed} checks failed"]
    return "\n".join(lines)


def doctor_command(socket: str, fmt: str) -> int:
    from gpud.cli.hostinfo import host_root
    from gpud.cli.output import render
    from gpud.host.doctor import collect

    report = collect(host_root(), socket)
    print(render(report.as_dict(), fmt, report_table(report)))
    return EXIT_OK if report.ok else EXIT_FAILED
