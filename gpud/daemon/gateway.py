"""The control socket, with the caller's credentials made visible to the gRPC handlers.

grpcio does not expose a unix-socket peer's credentials. So the public socket is served here:
for each connection the kernel's SO_PEERCRED answer is read, and the bytes are relayed to the
real gRPC server on a socket in a root-only directory, from a client socket whose (abstract)
address spells the caller's uid and pid. gRPC reports that address as the call's peer, which
:func:`peer_uid` parses. Only this process can reach the inner socket, so the address cannot be
forged by a caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import shutil
import socket
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_PREFIX = "gpud-peer"
_CREDS = struct.Struct("3i")


class SocketInUse(RuntimeError):
    """Another process serves the control socket: most likely a second gpud."""


def peer_uid(peer: str) -> int | None:
    """The uid encoded by the gateway in a gRPC peer string, None for any other peer."""
    _, _, address = peer.partition(":")
    parts = address.split("/")
    if len(parts) != 4 or parts[0] != _PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def _check_not_served(path: Path) -> None:
    """Refuse to take over a socket somebody answers on; remove it if it is stale."""
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketInUse(f"{path} is already served by another process (is gpud already running?)")


class Gateway:
    def __init__(self, public: Path, group: str) -> None:
        self.public = public
        self.group = group
        self.private_dir = public.parent / f".{public.name}.d"
        self.inner = self.private_dir / "api.sock"
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count()
        self._relays: set[asyncio.Task[None]] = set()

    def prepare(self) -> str:
        """Create the directories and return the inner address for the gRPC server to bind."""
        self.public.parent.mkdir(parents=True, exist_ok=True)
        _check_not_served(self.public)
        shutil.rmtree(self.private_dir, ignore_errors=True)
        self.private_dir.mkdir(mode=0o700)
        return f"unix:{self.inner}"

    async def start(self) -> None:
        old = os.umask(0o117)  # the socket is born 0660, never briefly world-writable
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(self.public))
        finally:
            os.umask(old)
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.warning(
                "group %r does not exist; only root can use %s (create the group, or set "
                "paths.socketGroup)",
                self.group,
                self.public,
            )
        else:
            os.chown(self.public, -1, gid)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._relays):
                task.cancel()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.public)
        shutil.rmtree(self.private_dir, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._relays.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # stop() ends the relays of connected clients. Ending quietly is the whole point: the
            # stream server of Python 3.11 asks a cancelled task for its exception and logs the
            # CancelledError that raises, with a traceback, on every shutdown with a client.
            pass
        finally:
            if task is not None:
                self._relays.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        pid, uid, _ = _CREDS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        )
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.bind(f"\0{_PREFIX}/{uid}/{pid}/{os.getpid()}-{next(self._ids)}")
        upstream.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(upstream, str(self.inner))
        except OSError as exc:
            upstream.close()
            log.error("control API unreachable behind the gateway: %s", exc)
            return
        up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            up_writer.close()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()
