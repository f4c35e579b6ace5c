"""``/metrics`` and ``/health`` over HTTP, as a publisher of the node state.

Nothing runs between scrapes: the server is a listening socket in gpud's event loop, and a
scrape asks kubelet's PodResources (in the loop, bounded by a short timeout) and then reads the
GPUs and writes the text in a worker thread, so a slow GPU read never holds the daemon up. A
node nobody scrapes costs no CPU. A scrape that cannot reach PodResources still answers, without
pod labels, and the publisher shows degraded in ``gpudctl status`` with the reason until a later
scrape reaches it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gpud.hw.backend import Backend
from gpud.k8s.podresources import PodResourcesClient, PodResourcesUnavailable
from gpud.metrics.address import ListenAddress
from gpud.metrics.dcgm import dcgm_families
from gpud.metrics.exposition import CONTENT_TYPE, render
from gpud.metrics.own import own_families
from gpud.node.hub import PublisherLink, Update
from gpud.node.state import NodeState
from gpud.node.stats import StatsSnapshot
from gpud.observe.pods import PodDevices, holders, pod_devices
from gpud.observe.rows import device_rows, read_all

log = logging.getLogger(__name__)

# kubelet answers List in milliseconds; a scrape must not wait on a wedged kubelet for long
# (Prometheus' default scrape timeout is 10 s, dcgm-exporter waits up to 10 s per scrape).
POD_RESOURCES_TIMEOUT_S = 1.0
# A client that does not send its request line and headers in this time is dropped.
REQUEST_TIMEOUT_S = 10.0

LANDING = (
    b"<html><head><title>gpud</title></head><body><h1>gpud</h1>"
    b'<p><a href="/metrics">Metrics</a></p></body></html>\n'
)


class ListenFailed(OSError):
    """``metrics.listen`` cannot be bound; the message names the address."""


class Scrape(Collector):
    """One scrape's families: dcgm-exporter's from the GPUs read now, then gpud's own."""

    def __init__(
        self,
        state: NodeState,
        pod_devices: PodDevices,
        stats: StatsSnapshot,
        backend: Backend,
        hostname: str,
    ) -> None:
        self._state = state
        self._pod_devices = pod_devices
        self._stats = stats
        self._backend = backend
        self._hostname = hostname

    def collect(self) -> Iterator[Metric]:
        state = self._state
        rows = device_rows(state, read_all(self._backend, state), holders(state, self._pod_devices))
        yield from dcgm_families(rows, state.system.driver_version, self._hostname)
        yield from own_families(state, self._stats)


class MetricsPublisher:
    name = "metrics"

    def __init__(
        self,
        listen: ListenAddress,
        backend: Backend,
        *,
        hostname: str | None = None,
        pod_resources_timeout: float = POD_RESOURCES_TIMEOUT_S,
    ) -> None:
        self._listen = listen
        self._backend = backend
        self._hostname = socket.gethostname() if hostname is None else hostname
        self._timeout = pod_resources_timeout
        self._link: PublisherLink | None = None
        self._server: asyncio.Server | None = None
        self._pod_resources: PodResourcesClient | None = None

    async def start(self, link: PublisherLink) -> None:
        """Bind ``metrics.listen``; raises ListenFailed naming the address when it cannot."""
        self._link = link
        try:
            self._server = await asyncio.start_server(
                self._serve, self._listen.host, self._listen.port
            )
        except OSError as exc:
            # asyncio words a bind error with the whole sockaddr; the errno's text is enough.
            plain = exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror)
            reason = os.strerror(exc.errno) if plain else (exc.strerror or str(exc))
            raise ListenFailed(
                f"cannot serve /metrics on {self._listen} (metrics.listen, --metrics-listen): "
                f"{reason}",
            ) from exc
        if not self._server.sockets:
            # Python before 3.13 skips an address family it may not use (a sandbox without
            # AF_INET) and serves nowhere rather than fail.
            self._server.close()
            self._server = None
            raise ListenFailed(
                f"cannot serve /metrics on {self._listen} (metrics.listen, --metrics-listen): "
                "no socket could be made for it (are TCP sockets forbidden to gpud?)"
            )
        link.set_detail(f"serving /metrics on {', '.join(self.addresses())}")

    def addresses(self) -> list[str]:
        """Where it listens, ``host:port`` (``[host]:port`` for IPv6); the port chosen for 0."""
        if self._server is None:
            return []
        out = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    async def publish(self, update: Update) -> None:
        """Nothing to do: a scrape reads the latest snapshot when it comes."""

    async def stop(self) -> None:
        if self._pod_resources is not None:
            await self._pod_resources.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def scrape(self) -> bytes:
        """The exposition as of now."""
        link = self._link
        assert link is not None, "scraped before start"
        state = link.latest()
        pod_devices = await self._pod_devices(link, state.pod_resources_socket)
        scrape = Scrape(state, pod_devices, link.stats.read(), self._backend, self._hostname)
        return await asyncio.to_thread(lambda: render(scrape.collect()))

    async def _pod_devices(self, link: PublisherLink, socket_path: Path) -> PodDevices:
        if self._pod_resources is None or self._pod_resources.socket != socket_path:
            if self._pod_resources is not None:
                await self._pod_resources.close()
            self._pod_resources = PodResourcesClient(socket_path)
        try:
            found = pod_devices(await self._pod_resources.list(self._timeout))
        except PodResourcesUnavailable as exc:
            link.degraded(f"metrics carry no pod labels: {exc}")
            return {}
        link.recovered()
        return found

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            status, headers, body = await self._answer(head)
            headers.append(("Content-Length", str(len(body))))
            if head.startswith(b"HEAD "):
                body = b""
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
            writer.write("\r\n".join([*lines, "Connection: close", "", ""]).encode() + body)
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
            ConnectionError,
        ):
            pass  # a client that went away, or sent no request in time, gets nothing
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        plain = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if len(parts) != 3:
            return "400 Bad Request", plain, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [*plain, ("Allow", "GET, HEAD")], b"GET or HEAD\n"
        if target == "/metrics":
            try:
                body = await self.scrape()
            except Exception:
                log.exception("a scrape of /metrics failed")
                return "500 Internal Server Error", plain, b"scrape failed; see gpud's log\n"
            return "200 OK", [("Content-Type", CONTENT_TYPE), plain[1]], body
        if target == "/health":
            return "200 OK", plain, b"OK"
        if target == "/":
            return "200 OK", [("Content-Type", "text/html; charset=utf-8"), plain[1]], LANDING
        return "404 Not Found", plain, b"not found; try /metrics\n"
