"""Listening sockets for dfly's own TCP servers (the daemon's piece, proxy and health listeners).

Rules:
- `::` means every interface, IPv4 included (one dual-stack socket), as it does for the gRPC listeners
  and for Go servers such as Dragonfly's; any other IPv6 address listens on IPv6 only; an IPv4 address
  on IPv4 only. `asyncio` and `socket.create_server` would make `::` IPv6-only, so IPv4 peers and
  clients of a daemon configured with `::` were refused.
- The socket is bound and listening, non-blocking, with SO_REUSEADDR; a bind failure is the OSError
  of `bind` (the caller turns it into a config error naming its key).
- `enable_keepalive`: TCP keepalive on a long-lived connection, so one whose peer vanished (power loss,
  a partition) is closed after `idle + interval · count` seconds instead of never when nothing is sent.
- `host_port`: `host:port`, an IPv6 address in brackets (`[::1]:8002`), for dialling, binding and logs.
- `dialable_host`: the host part of a `host:port` to dial (a CONNECT target, a scheduler address).
"""

from __future__ import annotations

import ipaddress
import re
import socket

_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def dialable_host(host: str, bracketed: bool) -> bool:
    """A DNS name or an IP address (IPv6 only in brackets, given here without them): what is checked is
    exactly what is dialled, so no userinfo, whitespace or control characters a URL parser would drop."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return not bracketed and len(host) <= 253 and _HOST_NAME.fullmatch(host) is not None
    return bracketed == (ip.version == 6)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (port 0 = the kernel's choice)."""
    host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    every_interface = family == socket.AF_INET6 and ipaddress.ip_address(host.split("%")[0]).is_unspecified
    sock = socket.create_server(
        (host, port),
        family=family,
        backlog=backlog,
        dualstack_ipv6=every_interface and socket.has_dualstack_ipv6(),
    )
    sock.setblocking(False)
    return sock


KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 3


def enable_keepalive(
    sock: socket.socket,
    idle_s: int = KEEPALIVE_IDLE_S,
    interval_s: int = KEEPALIVE_INTERVAL_S,
    count: int = KEEPALIVE_COUNT,
) -> None:
    """Probe an idle connection after `idle_s`, every `interval_s`; drop it after `count` unanswered."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
