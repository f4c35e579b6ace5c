"""Switching a node between the device-plugin API and DRA: the old API's sockets go first.

One node must never offer the same GPUs through both APIs: neither kubelet's device manager nor
the scheduler's DRA allocator sees the other's allocations, so a GPU would be handed out twice
(shared/reference/dra.md §6). ``allocation.mode`` applies when gpud starts. A clean stop removes
the sockets of the mode that ran; after a kill -9 they stay, and kubelet would go on dialling a
plugin that is gone. So at start the mode that runs removes the other mode's sockets that nobody
answers on, before it advertises anything. A socket that does answer belongs to a live process
(NVIDIA's plugin, another gpud): it is left alone and reported, and the caller refuses to
advertise beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Withdrawal:
    removed: list[Path] = field(default_factory=list)
    live: list[Path] = field(default_factory=list)


def answers(path: Path) -> bool:
    """Whether a process listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


def withdraw(paths: Iterable[Path]) -> Withdrawal:
    """Remove the sockets among ``paths`` that nobody answers on; list the live ones."""
    out = Withdrawal()
    for path in paths:
        if not path.is_socket():
            continue
        if answers(path):
            out.live.append(path)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        out.removed.append(path)
    return out


def device_plugin_sockets(plugin_dir: Path) -> list[Path]:
    """The sockets gpud's device plugins serve (``nvidia-<resource>.sock``)."""
    if not plugin_dir.is_dir():
        return []
    return sorted(plugin_dir.glob("nvidia-*.sock"))


def dra_sockets(kubelet_root: Path, driver: str) -> list[Path]:
    """The DRA plugin's registration socket and service socket."""
    return [
        registration_socket(kubelet_root, driver),
        service_socket(kubelet_root, driver),
    ]


def registration_socket(kubelet_root: Path, driver: str) -> Path:
    return kubelet_root / "plugins_registry" / f"{driver}-reg.sock"


def service_socket(kubelet_root: Path, driver: str) -> Path:
    return kubelet_root / "plugins" / driver / "dra.sock"
