"""A real Prometheus (Debian's ``prometheus``) scraping gpud, queried through its HTTP API.

It listens on loopback only, keeps its data in the test's directory and scrapes every second,
so "after two scrapes" is a couple of seconds away.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, root: Path, targets: Mapping[str, str]) -> None:
        """``targets``: job name -> ``host:port`` of a /metrics."""
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: scripts/setup installs Debian's prometheus")
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        jobs = [
            {"job_name": job, "static_configs": [{"targets": [address]}]}
            for job, address in targets.items()
        ]
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
                    "scrape_configs": jobs,
                }
            )
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = root / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address={self.address}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready:\n{self.log_path.read_text()}")
            time.sleep(0.2)

    def api(self, path: str, **params: str | Sequence[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(
            f"http://{self.address}/api/v1/{path}?{query}", timeout=10
        ) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (a list of {metric, value})."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def until(self, expr: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until ``expr`` has ``count`` series; return them."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if len(result) == count:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr}: {len(result)} series, wanted {count}: {result}")
            time.sleep(0.5)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
