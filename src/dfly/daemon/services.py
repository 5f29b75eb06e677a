"""The daemon's small network edges: the control gRPC service (4000) and `GET /healthy` (4003).

Rules:
- `DownloadTask` makes this daemon fetch from the origin, so it is accepted only from trusted
  scheduler addresses (config `control.trusted_schedulers`, default the hosts of `scheduler.addrs`);
  anyone else gets PERMISSION_DENIED. A trusted entry that is a host name (`scheduler.addrs` may name
  hosts) stands for every address it resolves to when a caller is checked, cached for
  TRUST_RESOLVE_TTL_S (a scheduler behind DNS may move). Names are looked up together, each lookup at
  most TRUST_RESOLVE_TIMEOUT_S (inside the scheduler's 10 s trigger timeout, above glibc's 5 s per name
  server) and shared by the callers checked meanwhile. A name that does not exist trusts nobody; one
  whose lookup fails for a while (a timeout, a resolver's "try again") keeps the addresses it last
  resolved to, for at most TRUST_STALE_MAX_S after that answer.
- The health endpoint answers 200 to `GET /healthy` and 404 to anything else; it reads at most one
  small request per connection and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from dfly.api import daemon_pb2 as dpb
from dfly.api import daemon_pb2_grpc as dpb_grpc
from dfly.common.errors import DflyError
from dfly.common.net import listen_socket
from dfly.daemon.task_request import TaskRequest

log = logging.getLogger(__name__)

TRUST_RESOLVE_TTL_S = 60.0
TRUST_RESOLVE_TIMEOUT_S = 8.0
TRUST_STALE_MAX_S = 300.0
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' / 'ipv6:[::1]:5555' -> the IP. grpcio percent-encodes an IPv6 caller's
    brackets and zone (`ipv6:%5B::1%5D:5555`), so the address is decoded first."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener sees IPv4 callers as ::ffff:a.b.c.d
    return ip


Resolve = Callable[[str], Awaitable[list[str]]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


async def resolve_host(name: str) -> list[str]:
    """Every address `name` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class TrustedSchedulers:
    """The callers allowed to trigger downloads: IP addresses, and host names resolved on demand."""

    def __init__(
        self,
        entries: list[str],
        resolve: Resolve = resolve_host,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = TRUST_RESOLVE_TIMEOUT_S,
    ) -> None:
        self._ips = {ip for ip in map(_ip, entries) if ip is not None}
        self._names = [entry for entry in entries if _ip(entry) is None and entry]
        self._resolve = resolve
        self._clock = clock
        self._timeout_s = timeout_s
        self._resolved: dict[str, _Answer] = {}
        self._lookups: dict[str, asyncio.Task[set[Address]]] = {}  # in flight, shared by their callers

    async def allows(self, caller: str) -> bool:
        ip = _ip(caller)
        if ip is None:
            return False
        if ip in self._ips:
            return True
        found = await asyncio.gather(*(self._addresses(name) for name in self._names))
        return any(ip in addresses for addresses in found)

    async def _addresses(self, name: str) -> set[Address]:
        cached = self._resolved.get(name)
        if cached is not None and self._clock() - cached.checked_at < TRUST_RESOLVE_TTL_S:
            return cached.addresses
        lookup = self._lookups.get(name)
        loop = asyncio.get_running_loop()
        if lookup is None or lookup.get_loop() is not loop:
            lookup = loop.create_task(self._lookup(name, cached))
            self._lookups[name] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_ended, name))
        return await asyncio.shield(lookup)  # a caller that leaves does not end it for the others

    def _lookup_ended(self, name: str, lookup: asyncio.Task[set[Address]]) -> None:
        if self._lookups.get(name) is lookup:
            del self._lookups[name]

    async def _lookup(self, name: str, cached: _Answer | None) -> set[Address]:
        now = self._clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                found = {ip for ip in map(_ip, await self._resolve(name)) if ip is not None}
        except (OSError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self._timeout_s:g} s"
            gone = isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_NAME
            if gone or cached is None or now - cached.confirmed_at > TRUST_STALE_MAX_S:
                log.warning("trusted scheduler %s does not resolve: %s; it trusts nobody", name, why)
                self._resolved[name] = _Answer(set(), now, now)
                return set()
            log.warning("trusted scheduler %s does not resolve (%s): its last addresses stay", name, why)
            self._resolved[name] = _Answer(cached.addresses, now, cached.confirmed_at)
            return cached.addresses
        self._resolved[name] = _Answer(found, now, now)
        return found


@dataclass(frozen=True, slots=True)
class _Answer:
    """What a trusted name stands for: its addresses, when that was last checked, and when a lookup last
    gave them (a stale answer is kept only for a while after that)."""

    addresses: set[Address]
    checked_at: float
    confirmed_at: float


class ControlService(dpb_grpc.DfdaemonControlServicer):
    def __init__(self, trusted: TrustedSchedulers, trigger: Callable[[TaskRequest], str]) -> None:
        self._trusted = trusted
        self._trigger = trigger

    async def DownloadTask(
        self, request: dpb.DownloadTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> dpb.DownloadTaskResponse:
        caller = peer_ip(context.peer())
        if not await self._trusted.allows(caller):
            log.warning("refused DownloadTask from untrusted %s", caller or context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{caller or 'caller'} is not a trusted scheduler"
            )
        try:
            wanted = TaskRequest.seed_trigger(request.download)
        except DflyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.task_id and request.task_id != wanted.task_id:
            # this seed would fetch another task than the one its peers wait for: refused, so the scheduler
            # lets a peer read the origin at once instead of waiting for a seed that never serves it
            mismatch = f"task id {request.task_id[:12]} differs from {wanted.task_id[:12]} for this download"
            log.warning("refused DownloadTask: %s", mismatch)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, mismatch)
        return dpb.DownloadTaskResponse(task_id=self._trigger(wanted), accepted=True)


async def start_health_server(
    ip: str, port: int, not_ready: Callable[[], str | None] = lambda: None
) -> asyncio.Server:
    """`GET /healthy`: 200 while the event loop answers (liveness). `GET /ready`: 200 once the daemon
    serves the swarm (`not_ready()` is None), else 503 with the reason (readiness)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            if line.startswith(b"GET /healthy "):
                status, body = b"200 OK", b"OK"
            elif line.startswith(b"GET /ready "):
                why = not_ready()
                status, body = (
                    (b"200 OK", b"OK") if why is None else (b"503 Service Unavailable", why.encode())
                )
            else:
                status, body = b"404 Not Found", b"not found"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=listen_socket(ip, port))
