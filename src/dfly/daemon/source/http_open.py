"""One GET to an origin for source/http.py: connect (TLS with the given trust), send, follow redirects.

Rules: at most MAX_REDIRECTS redirects (301/302/303/307/308); every host contacted, the first included,
must pass `allowed_hosts` when given (a `HostGuard`: its name, and then every address a connection is
actually made to, so a name that resolves differently the second time cannot slip through);
Authorization and Cookie are dropped once a redirect leaves the origin (scheme, host, port); user info
in the URL becomes Basic auth unless Authorization is set. Failures are `SourceError`s (status 0 when
no HTTP status was received), without query strings. A `SourceInterrupt` ends a blocked connect or
read from another thread: it shuts the connection's socket down through its own duplicate fd (taken
before the connect, before any TLS wrap), and stops waiting for a name lookup (left to end in its own
daemon thread), so the daemon's stop never waits out an origin's or a resolver's timeouts.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from dfly.common.errors import SourceError, SourceRefused, is_out_of_descriptors, out_of_descriptors
from dfly.common.ids import ascii_host, redact_url
from dfly.common.net import host_port

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
RESOLVE_POLL_S = 0.2
_CROSS_ORIGIN_DROPPED = ("authorization", "cookie")


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs share scheme, host and port (where credentials may go)."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def without_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers` minus Authorization and Cookie: for another origin than the one they were given for."""
    return {k: v for k, v in headers.items() if k.lower() not in _CROSS_ORIGIN_DROPPED}


_TARGET_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII stays as the user wrote it


def _no_address_refused(address: str) -> bool:
    return False


@dataclass(frozen=True)
class HostGuard:
    """What an origin read may contact: `allowed(scheme, host, port)` for each hop's host, and no address
    for which `address_refused(ip)` holds, checked on the address each connection is made to."""

    allowed: Callable[[str, str, int], bool]
    address_refused: Callable[[str], bool] = _no_address_refused
    refused_kind: str = "a link-local or metadata address"  # what address_refused refuses, for messages


AllowedHosts = HostGuard
_ANY_HOST = HostGuard(lambda _scheme, _host, _port: True)


def _refused_literal(guard: HostGuard, host: str) -> bool:
    try:
        return guard.address_refused(host)
    except ValueError:  # a name, not an address
        return False


class SourceInterrupt:
    """Lets another thread end the blocking connect or read of the origin connection in use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: socket.socket | None = None  # a duplicate of the connection's socket
        self.interrupted = False

    def interrupt(self) -> None:
        """Shut the current connection down both ways (its blocked call returns at once) and refuse
        every later one."""
        with self._lock:
            self.interrupted = True
            if self._watched is not None:
                _shut(self._watched)

    def shut(self) -> None:
        """Shut the current connection down (a piece deadline passed); later ones may still be made."""
        with self._lock:
            if self._watched is not None:
                _shut(self._watched)

    def watch(self, sock: socket.socket) -> None:
        """Follow `sock` (a new connection, before its connect) instead of the previous one; refused
        (ConnectionAbortedError) once interrupted."""
        with self._lock:
            self._close_watched()
            if self.interrupted:
                raise ConnectionAbortedError("the read was stopped")
            self._watched = sock.dup()

    @property
    def watching(self) -> bool:
        """A connection is followed now (made, or being made)."""
        return self._watched is not None

    def release(self) -> None:
        """The read is over: close the duplicate (nothing is shut down any more)."""
        with self._lock:
            self._close_watched()

    def _close_watched(self) -> None:
        if self._watched is not None:
            self._watched.close()
            self._watched = None


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected yet or already closed: nothing to end
        sock.shutdown(socket.SHUT_RDWR)


def _resolve(host: str, port: int, interrupt: SourceInterrupt | None) -> list[Any]:
    """getaddrinfo; with an interrupt, in a daemon thread of its own, waited for in short slices, so an
    interrupt ends the wait within RESOLVE_POLL_S even while the resolver waits out its own timeouts."""
    if interrupt is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if interrupt.interrupted:
        raise ConnectionAbortedError("the read was stopped")
    lookup: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

    def run() -> None:
        try:
            lookup.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread
            lookup.set_exception(exc)

    try:
        threading.Thread(target=run, name="origin-dns", daemon=True).start()
    except RuntimeError:  # no thread to spare (a thread limit): look it up here, uninterruptibly
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    while True:
        try:
            return lookup.result(timeout=RESOLVE_POLL_S)
        except concurrent.futures.TimeoutError:
            if interrupt.interrupted:
                raise ConnectionAbortedError("the read was stopped") from None


def _connect_checked(
    guard: HostGuard,
    interrupt: SourceInterrupt | None,
    address: tuple[str, int],
    timeout: float | None = None,
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """socket.create_connection, refusing the name if any address it resolves to is refused; the socket
    is watched by `interrupt` from before its connect."""
    host, port = address
    infos = _resolve(host, port, interrupt)
    for *_, sockaddr in infos:
        if guard.address_refused(str(sockaddr[0])):
            raise PermissionError(f"{host} resolves to {sockaddr[0]}, {guard.refused_kind}")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if interrupt is not None:
                interrupt.watch(sock)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error if error is not None else OSError(f"{host} resolves to no address")


def open_get(
    url: str,
    headers: dict[str, str],
    timeout_s: float,
    allowed_hosts: AllowedHosts | None,
    ca_file: str | None,
    insecure: bool,
    interrupt: SourceInterrupt | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """Send the GET, following redirects; return the open connection, its response and the final URL.
    `interrupt` can end each hop's connect and reads from another thread; the caller releases it once
    done with the connection (here, if no connection is returned)."""
    try:
        first_url = url
        for hop in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SourceError(f"unsupported source URL {redact_url(url)}: expected http(s)://host/…")
            try:
                host = ascii_host(parts.hostname)  # an internationalized name: its IDNA form is what resolves
            except ValueError as exc:
                where = f"the origin's redirect to {redact_url(url)}" if hop else redact_url(url)
                raise SourceError(f"invalid host name in {where}: {exc}") from None
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError as exc:
                raise SourceError(f"invalid port in source URL {redact_url(url)}") from exc
            if allowed_hosts is not None and not allowed_hosts.allowed(parts.scheme, host, port):
                why = f", {allowed_hosts.refused_kind}," if _refused_literal(allowed_hosts, host) else ""
                raise SourceRefused(f"source host {host}{why} is not allowed ({redact_url(url)})")
            conn: http.client.HTTPConnection
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=timeout_s, context=tls_context(ca_file, insecure)
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            guard = allowed_hosts if allowed_hosts is not None else _ANY_HOST
            # http.client's own hook for making the socket (HTTPS wraps it after)
            conn._create_connection = functools.partial(_connect_checked, guard, interrupt)  # type: ignore[attr-defined]
            req = dict(headers)
            if parts.username is not None and not any(k.lower() == "authorization" for k in req):
                user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
                req["Authorization"] = "Basic " + base64.b64encode(user_pass).decode("ascii")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = quote(target, safe=_TARGET_SAFE)  # only non-ASCII bytes change: %-encoded UTF-8
            try:
                conn.request("GET", target, headers=req)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if is_out_of_descriptors(exc):  # this host's load: not the origin's failure, not the task's
                    raise out_of_descriptors("connecting to the origin") from None
                raise connect_error(host, port, timeout_s, exc) from exc
            if resp.status not in REDIRECT_STATUSES:
                return conn, resp, url
            location = resp.getheader("Location")
            resp.close()
            conn.close()
            if interrupt is not None:
                interrupt.release()  # that hop's duplicate goes with it
            if not location:
                raise SourceError(
                    f"origin redirect {resp.status} without Location from {redact_url(url)}", resp.status
                )
            if hop == MAX_REDIRECTS:
                raise SourceError(
                    f"too many redirects (more than {MAX_REDIRECTS}) from {redact_url(first_url)}",
                    resp.status,
                )
            try:
                new_url = urljoin(url, location)
                new = urlsplit(new_url)
            except ValueError:  # "http://[::1" and the like; not shown: a Location may carry a signed query
                raise SourceError(
                    f"origin redirect {resp.status} from {redact_url(url)} to an invalid URL", resp.status
                ) from None
            if (new.scheme, new.hostname, new.port) != (parts.scheme, parts.hostname, parts.port):
                headers = without_credentials(headers)
            url = new_url
        raise AssertionError("unreachable")
    except BaseException:
        if interrupt is not None:
            interrupt.release()
        raise


@functools.lru_cache(maxsize=8)
def tls_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect_error(host: str, port: int, timeout_s: float, exc: BaseException) -> SourceError:
    where = host_port(host, port)
    if isinstance(exc, socket.gaierror):
        text = f"cannot resolve origin host {where}: {exc.strerror or exc}"
    elif isinstance(exc, ConnectionRefusedError):
        text = f"connection refused by origin {where}"
    elif isinstance(exc, TimeoutError):
        text = f"origin {where} did not answer within {timeout_s:g}s"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        text = f"TLS certificate of origin {where} not trusted: {exc.verify_message or exc}"
    elif isinstance(exc, ssl.SSLError):
        text = f"TLS error with origin {where}: {exc.reason or exc}"
    elif isinstance(exc, PermissionError) and exc.errno is None:  # _connect_checked's refusal
        return SourceRefused(f"origin {where} refused: {exc}", 0)
    elif isinstance(exc, OSError):
        text = f"cannot reach origin {where}: {exc.strerror or exc}"
    else:
        text = f"bad response from origin {where}: {type(exc).__name__} {exc}".rstrip()
    return SourceError(text, 0)
