"""``metrics.listen``: where ``/metrics`` is served, spelled as dcgm-exporter's ``--address``.

``:9400`` means every address (IPv4 and IPv6), as Go's listener takes it; ``127.0.0.1:9400`` and
``[::1]:9400`` one address; port 0 a free port (for tests, which read the port back from
``gpudctl status``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """``host`` is None for every address; otherwise an IP address or a host name."""

    host: str | None
    port: int

    def __str__(self) -> str:
        if self.host is None:
            return f":{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT``; ValueError saying what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. :9400 or 127.0.0.1:9400)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r}: an IPv6 address is written [ADDRESS]:PORT")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9400")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return ListenAddress(host or None, int(port_text))
