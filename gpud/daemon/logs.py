"""Logging to journald with structured fields under systemd, to stderr elsewhere.

Call sites pass upper-case ``extra`` keys (``GPU_UUID``, ``RESOURCE``, ``STEP``); journald stores
them as fields an operator can filter on (``journalctl -u gpud GPU_UUID=GPU-…``), and the stderr
format appends them as ``KEY=value`` so the same facts show up in a terminal.
"""

from __future__ import annotations

import logging
import os
import sys

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _FieldsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and k.isupper()
        ]
        return f"{text} {' '.join(fields)}" if fields else text


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to stderr's device:inode when stderr goes to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(level: str) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handler: logging.Handler | None = None
    if _stderr_is_journal():
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            handler = None
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="gpud")
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
