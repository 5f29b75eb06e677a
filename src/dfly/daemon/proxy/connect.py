"""Socket mechanics of port 4001: the accept loop that sends CONNECT here and everything else to aiohttp,
the CONNECT head reader, and the byte tunnel. Policy (who may connect where, what is intercepted) lives
in server.py.

Rules:
- Each accepted connection's first bytes are peeked, not read: unless they are `CONNECT `, the socket
  goes to the aiohttp server untouched.
- A CONNECT head is at most 16 KiB and must arrive within 30 s, else the connection is closed.
- A tunnel relays bytes both ways until each side has closed its half; an error on either side ends both.
  Bytes the client sent after the head (before our 200) are relayed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from dfly.common.net import dialable_host, host_port
from dfly.daemon.proxy.registry import BadRequest, Forbidden

log = logging.getLogger(__name__)

CONNECT_PREFIX = b"CONNECT "
HEAD_LIMIT = 16 * 1024
PEEK_PAUSE_MAX_S = 0.2
HEAD_TIMEOUT_S = 30.0
RELAY_CHUNK = 256 * 1024


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _starts_with_connect(sock: socket.socket) -> bool:
    """Peek until the first bytes show whether this is a CONNECT (EOF or other bytes: not one).

    While they are a part of "CONNECT " the socket stays readable, so it is peeked again after a pause
    that doubles up to PEEK_PAUSE_MAX_S: a client that sends a few bytes at a time is read within
    milliseconds, and one that stops (or closed after "C") costs ~150 wake-ups until HEAD_TIMEOUT_S,
    not one every 10 ms."""
    pause = 0.01
    while True:
        await _readable(sock)
        try:
            first = sock.recv(len(CONNECT_PREFIX), socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not first or not CONNECT_PREFIX.startswith(first):
            return False
        if first == CONNECT_PREFIX:
            return True
        await asyncio.sleep(pause)
        pause = min(pause * 2, PEEK_PAUSE_MAX_S)


async def accept_loop(
    listener: socket.socket,
    on_plain: Callable[[socket.socket], Awaitable[None]],
    on_connect: Callable[[socket.socket], Awaitable[None]],
    max_connections: int = 4096,
    handed_off: Callable[[], int] = lambda: 0,
) -> None:
    """Accept forever; each connection is dispatched in its own task (kept in `tasks` until done). With
    `max_connections` open (those tasks plus `handed_off()`, the connections HTTP servers took over),
    one more is closed at once (logged once per burst)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    refusing = False

    async def dispatch(conn: socket.socket) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                is_connect = await _starts_with_connect(conn)
        except (TimeoutError, OSError):
            conn.close()
            return
        try:
            await (on_connect(conn) if is_connect else on_plain(conn))
        except OSError as exc:  # the client reset or closed its side: nothing to answer
            log.debug("proxy connection ended: %r", exc)
            conn.close()
        except Exception:
            log.exception("proxy connection failed")
            conn.close()

    try:
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                log.warning("proxy accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if (open_now := len(tasks) + handed_off()) >= max_connections:
                conn.close()
                if not refusing:
                    log.warning(
                        "proxy: %d connections open (proxy.max_connections); closing new ones", open_now
                    )
                refusing = True
                continue
            refusing = False
            conn.setblocking(False)
            task = asyncio.create_task(dispatch(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head through the blank line, bytes after it); BadRequest if too long, closed or too slow."""
    loop = asyncio.get_running_loop()
    buffer = b""
    too_long = BadRequest(f"CONNECT head longer than {HEAD_LIMIT} bytes")
    try:
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                if len(buffer) >= HEAD_LIMIT:
                    raise too_long
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    raise BadRequest("connection closed inside the CONNECT head")
                buffer += data
    except TimeoutError:
        raise BadRequest(f"no complete CONNECT head within {HEAD_TIMEOUT_S:.0f} s") from None
    if end + 4 > HEAD_LIMIT:  # the blank line counts: at most HEAD_LIMIT bytes in all
        raise too_long
    return buffer[:end], buffer[end + 4 :]


def parse_connect(head: bytes) -> tuple[str, int, dict[str, str]]:
    """(host, port, headers with lower-case names) of `CONNECT host:port HTTP/1.x`; BadRequest if not."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest("malformed CONNECT request line") from None
    if method != "CONNECT" or not version.startswith("HTTP/1."):
        raise BadRequest("malformed CONNECT request line")
    host, sep, port_text = target.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    port_ok = port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536
    if not sep or not port_ok or not dialable_host(host, bracketed):
        raise BadRequest(f"CONNECT target must be host:port, got {target!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest("malformed header line in CONNECT request")
        headers[name.strip().lower()] = value.strip()
    return host, int(port_text), headers


async def reply(sock: socket.socket, status: int, headers: dict[str, str] | None = None) -> None:
    """The answer to a CONNECT: the status with its standard reason phrase (200: Connection Established)."""
    reason = "Connection Established" if status == 200 else HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    if status != 200:
        lines += ["Content-Length: 0", "Connection: close"]
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())


async def tunnel(client: socket.socket, upstream: socket.socket, early: bytes, idle_s: float = 600.0) -> None:
    """Relay both ways until both halves are closed, either side fails, or no byte moved either way for
    `idle_s` (one deadline, moved on by every chunk); closes both sockets."""
    loop = asyncio.get_running_loop()
    deadline: asyncio.Timeout | None = None

    async def pump(src: socket.socket, dst: socket.socket, first: bytes) -> None:
        if first:
            await loop.sock_sendall(dst, first)
        while data := await loop.sock_recv(src, RELAY_CHUNK):
            if deadline is not None:
                deadline.reschedule(loop.time() + idle_s)
            await loop.sock_sendall(dst, data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    pumps = {
        asyncio.create_task(pump(client, upstream, early)),
        asyncio.create_task(pump(upstream, client, b"")),
    }
    try:
        async with asyncio.timeout(idle_s) as deadline:
            pending = set(pumps)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [task for task in done if task.exception() is not None]
                if failed:
                    log.info("tunnel ended early: %r", failed[0].exception())
                    break
    except TimeoutError:
        log.info("tunnel closed: no byte either way for %g s", idle_s)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        client.close()
        upstream.close()


async def open_upstream(
    host: str, port: int, refused: Callable[[str], bool], timeout_s: float
) -> socket.socket:
    """A connected non-blocking socket to host:port; OSError if none of its addresses answers within
    timeout_s, Forbidden if every address is one for which `refused(address)` holds (checked on the very
    addresses connected to, so a name cannot resolve differently between the check and the
    connection)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    allowed = [info for info in infos if not refused(str(info[4][0]))]
    if not allowed:
        raise Forbidden(f"{host} resolves only to link-local or metadata addresses")
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in allowed:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout_s)
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            error = (
                exc if isinstance(exc, OSError) else OSError(f"connect to {host_port(host, port)} timed out")
            )
    raise error
