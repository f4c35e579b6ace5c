"""gpud under systemd: the notify protocol on a real socket, and journald selection."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.kubelet import FakeKubelet
from tests.support.process import GpudProcess


def _datagrams(sock: socket.socket, until: str, limit: int = 50) -> list[str]:
    seen: list[str] = []
    while len(seen) < limit:
        msg = sock.recv(4096).decode()
        seen.append(msg)
        if until in msg:
            return seen
    raise AssertionError(f"no {until!r} among {seen}")


def test_ready_status_watchdog_and_stopping(short_tmp: Path) -> None:
    notify = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(15)
    kubelet = FakeKubelet(short_tmp / "kubelet")
    kubelet.start()
    gpud = GpudProcess(
        "t4x1",
        short_tmp / "kubelet",
        short_tmp / "state",
        short_tmp / "gpud.sock",
        log_dir=short_tmp,
        env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "200000"},
    )
    gpud.start()
    try:
        before = _datagrams(sock, "READY=1")
        ready = before[-1]
        assert "STATUS=1/1 GPUs healthy, 1 plugins" in ready
        # While a start waits on the MIG layout, systemctl status says so.
        assert "STATUS=restoring the MIG layout before advertising any device" in before[0]
        # READY is only sent once the control socket answers.
        assert gpud.status().gpus[0].name == "Tesla T4"
        # The watchdog is pinged at half of WATCHDOG_USEC, from the event loop.
        _datagrams(sock, "WATCHDOG=1")
        _datagrams(sock, "WATCHDOG=1")
        assert gpud.terminate() == 0
        assert any("STOPPING=1" in m for m in _datagrams(sock, "STOPPING=1"))
    finally:
        if gpud.running():
            gpud.kill()
        kubelet.stop()
        sock.close()


def test_logs_go_to_journald_only_when_stderr_is_the_journal() -> None:
    script = (
        "import os, sys, logging\n"
        "st = os.fstat(2)\n"
        "if sys.argv[1] == 'journal':\n"
        "    os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "elif sys.argv[1] == 'other':\n"
        "    os.environ['JOURNAL_STREAM'] = '1:2'\n"
        "from gpud.daemon import logs\n"
        "logs.setup('info')\n"
        "print(type(logging.getLogger().handlers[0]).__name__)\n"
    )

    def handler(mode: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        out = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        return out.stdout.strip()

    assert handler("journal") == "JournalHandler"
    assert handler("other") == "StreamHandler"
    assert handler("none") == "StreamHandler"


def test_stderr_lines_carry_the_structured_fields() -> None:
    import logging

    from gpud.daemon.logs import _FieldsFormatter

    record = logging.LogRecord("gpud", logging.ERROR, "", 0, "GPU unhealthy", None, None)
    record.GPU_UUID = "GPU-1"
    record.XID = 79
    text = _FieldsFormatter("%(message)s").format(record)
    assert text == "GPU unhealthy GPU_UUID=GPU-1 XID=79"
