"""gpud's node agent in the test's own event loop, for tests that add a publisher of their own.

The agent is the one ``gpud run`` builds (:func:`gpud.daemon.compose.compose`) on a simulated
machine: its control API on a real unix socket, its device plugins registered with a fake kubelet
over real gRPC, kubelet's PodResources served by a fake with no pods. Only the extra publishers a
test adds, and the place the daemon runs, differ from a node. ``gpudctl`` is the real CLI in a
subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gpud.daemon.compose import compose
from gpud.daemon.settings import Overrides, resolve
from gpud.hw.sim.backend import SimBackend
from gpud.node.hub import PublisherLink, Update
from tests.support.kubelet import FakeKubelet
from tests.support.podresources import FakePodResources


class Agent:
    def __init__(self, root: Path, spec: str = "dgx-a100", config: str = "version: v1\n") -> None:
        self.root = root
        self.pod_resources = FakePodResources(root / "pod-resources.sock")
        pod_resources = f"paths:\n  podResourcesSocket: {self.pod_resources.socket_path}\n"
        self.config_file = root / "gpud.yaml"
        self.config_file.write_text(config + pod_resources)
        settings = resolve(
            self.config_file,
            Overrides(
                simulate=spec,
                kubelet_dir=root / "kubelet",
                state_dir=root / "state",
                socket=root / "gpud.sock",
                # Never the host's NFD directory, nor the host's :9400.
                nfd_dir=root / "nfd",
                metrics_listen="127.0.0.1:0",
            ),
        )
        self.socket = settings.config.paths.socket
        self.backend = SimBackend(spec, settings.config.paths.state_dir)
        self.daemon = compose(settings, self.backend)
        self.kubelet = FakeKubelet(root / "kubelet")

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        """Run the agent with ``scenario`` beside it, then SIGTERM it as systemd would."""

        async def main() -> None:
            daemon = asyncio.create_task(self.daemon.run())
            try:
                await asyncio.sleep(0)  # run() installs its signal handlers first thing
                await scenario()
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                assert await asyncio.wait_for(daemon, 30) == 0

        self.kubelet.start()
        try:
            with self.pod_resources:
                asyncio.run(main())
        finally:
            self.kubelet.stop()

    async def gpudctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gpud.cli.gpudctl", "--socket", str(self.socket), *args]
        return await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
        )

    async def status(self) -> dict[str, Any]:
        """``gpudctl status -o json``."""
        out = await self.gpudctl("status", "-o", "json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    async def wait_devices(self, resource: str, check: Callable[[dict[str, Any]], bool]) -> None:
        await asyncio.to_thread(self.kubelet.wait_devices, resource, check, timeout=20)


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until ``check()`` holds, looking every 10 ms."""

    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


class Recorder:
    """A publisher that keeps every update it is handed."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.updates: list[Update] = []
        self.link: PublisherLink | None = None

    async def start(self, link: PublisherLink) -> None:
        self.link = link

    async def publish(self, update: Update) -> None:
        self.updates.append(update)

    async def stop(self) -> None:
        return None

    def events(self, kind: type | None = None) -> list[Any]:
        return [e for u in self.updates for e in u.events if kind is None or isinstance(e, kind)]
