"""Run gpud as a real process, the way integration tests and benchmarks need it.

Integration tests must exercise the daemon exactly as a node runs it (its own process, signal
handling, sockets on disk), not an in-process object, so this starts
``python -m gpud.cli.gpud_main run --simulate ...`` with the test's directories and talks to it
over its control socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc

from gpud._proto.gpud.v1 import gpud_pb2, gpud_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


class GpudProcess:
    """One gpud daemon process in simulation mode.

    ``kubelet_dir`` is where gpud looks for ``kubelet.sock`` and creates its plugin sockets
    (normally a FakeKubelet's ``plugin_dir``); ``socket`` is gpud's control socket. Output goes
    to ``<log_dir>/gpud.log`` (a fresh temporary directory unless given) so a failing test can
    show what the daemon said. The environment is inherited, plus ``PYTHONUNBUFFERED=1`` so the
    log is complete at the moment it is read, and ``env`` overrides.
    """

    def __init__(
        self,
        simulate: str,
        kubelet_dir: Path,
        state_dir: Path,
        socket: Path,
        extra: Sequence[str] = (),
        *,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        if len(os.fsencode(str(socket))) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"control socket path {socket} is longer than {_MAX_SOCKET_PATH} bytes"
            )
        self.simulate = simulate
        self.kubelet_dir = Path(kubelet_dir)
        self.state_dir = Path(state_dir)
        self.socket = Path(socket)
        self.extra = list(extra)
        self.log_dir = (
            Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="gpud-log-"))
        )
        self.log_path = self.log_dir / "gpud.log"
        self.cwd = cwd
        self._env = dict(os.environ)
        self._env["PYTHONUNBUFFERED"] = "1"
        # Compile gpud once for all the processes a test run starts, as an installed package is:
        # this machine may say PYTHONDONTWRITEBYTECODE, which costs every start ~0.6 s.
        self._env.pop("PYTHONDONTWRITEBYTECODE", None)
        self._env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "gpud-test-pycache")
        if env:
            self._env.update(env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._stub: gpud_pb2_grpc.GpudStub | None = None

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gpud.cli.gpud_main",
            "run",
            "--simulate",
            self.simulate,
            "--kubelet-dir",
            str(self.kubelet_dir),
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(self.socket),
            # /metrics on a free loopback port, so that daemons side by side never contend for
            # :9400; a test that cares passes its own --metrics-listen.
            *([] if "--metrics-listen" in self.extra else ["--metrics-listen", "127.0.0.1:0"]),
            *self.extra,
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Launch the daemon; does not wait for it (see ``wait_ready``)."""
        if self.running():
            raise RuntimeError("gpud is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._close_channel()
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self.cwd,
            )

    def wait_ready(self, timeout: float = 30.0) -> gpud_pb2.Status:
        """Block until the control socket exists and answers ``GetStatus``; return that status.

        Polling is acceptable here because nothing notifies us of process start-up; it is
        bounded by ``timeout``. An early exit fails immediately with the daemon's log.
        """
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        last_error = "control socket not created"
        while True:
            code = proc.poll()
            if code is not None:
                raise AssertionError(
                    f"gpud exited with {code} before it was ready\n{self._log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"gpud not ready after {timeout}s ({last_error})\n{self._log_tail()}"
                )
            if self.socket.exists():
                try:
                    return self.stub.GetStatus(
                        gpud_pb2.GetStatusRequest(), timeout=max(0.05, min(1.0, remaining))
                    )
                except grpc.RpcError as err:
                    last_error = f"GetStatus failed: {err}"
            time.sleep(0.02)

    @property
    def stub(self) -> gpud_pb2_grpc.GpudStub:
        """Stub for gpud's control API on its unix socket (one cached channel)."""
        if self._stub is None:
            # After a kill -9 the old socket file lingers until the new gpud replaces it; a
            # short reconnect backoff keeps wait_ready from sleeping out gRPC's default second.
            self._channel = grpc.insecure_channel(
                f"unix:{self.socket}",
                options=[
                    ("grpc.use_local_subchannel_pool", 1),
                    ("grpc.initial_reconnect_backoff_ms", 20),
                    ("grpc.min_reconnect_backoff_ms", 20),
                    ("grpc.max_reconnect_backoff_ms", 100),
                ],
            )
            self._stub = gpud_pb2_grpc.GpudStub(self._channel)
        return self._stub

    def status(self, timeout: float = 5.0) -> gpud_pb2.Status:
        return self.stub.GetStatus(gpud_pb2.GetStatusRequest(), timeout=timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; return the exit code. A daemon that ignores SIGTERM for ``timeout``
        is killed and the call fails: a clean shutdown is part of what is under test."""
        proc = self._require_proc()
        self._close_channel()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"gpud did not exit within {timeout}s of SIGTERM; killed\n{self._log_tail()}"
                ) from None
        assert proc.returncode is not None
        return proc.returncode

    def kill(self) -> int:
        """SIGKILL and reap, as a crash or an OOM kill would end it; return the exit code."""
        proc = self._require_proc()
        self._close_channel()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """The log once it contains ``text``. The control socket answers before start-up is
        over (the MIG restore, the first registration), so a line those write may come after
        :meth:`wait_ready` returned; polling the file is bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s\n{self._log_tail()}")
            time.sleep(0.05)
        return log

    def _log_tail(self, limit: int = 8000) -> str:
        text = self.log()
        if len(text) > limit:
            text = "...\n" + text[-limit:]
        return f"--- gpud log ({self.log_path}) ---\n{text}"

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("gpud was not started")
        return self._proc

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def __enter__(self) -> GpudProcess:
        """Start and wait until ready, since every user needs a ready daemon."""
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is None:
            return
        if exc_type is None:
            self.terminate()
        else:
            # Do not let a shutdown problem hide the failure that got us here.
            self.kill()
