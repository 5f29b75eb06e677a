"""TLS for the piece server (`security.tls.pieces`): terminate TLS, hand the plaintext to the usual code.

Job: `serve_tls(sock, context, handshake_timeout_s, serve)` does the server side of the TLS handshake
on an accepted TCP socket, then runs `serve(inner)` on one end of a Unix socketpair while two pumps
copy bytes between the other end and the TLS stream. The piece server's connection logic (non-blocking
socket, sendfile of piece bodies) stays the same for plain and TLS connections.

Rules:
- A failed or slow handshake (no certificate from the cluster's CA, plain TCP, nothing within
  `handshake_timeout_s`) closes the connection before `serve` ever runs.
- Either side ending ends the other: the child's EOF reaches `serve` as EOF on its socket; when `serve`
  returns (and closes its socket) the rest is flushed to the child and the TLS stream closed.
- Backpressure both ways (`drain`): a slow child holds up the sender, nothing piles up in memory beyond
  one chunk plus the socket buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
_CHUNK = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:  # ssl.SSLError and connection resets included
        pass
    finally:
        writer.close()


async def serve_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    handshake_timeout_s: float,
    serve: Callable[[socket.socket], Awaitable[None]],
    flush_timeout_s: float = 60.0,
) -> None:
    """Handshake on `sock`, then `serve` the plaintext on a socketpair end; returns when both sides end
    (after `serve` returns, at most `flush_timeout_s` more for the child to take what is left)."""
    loop = asyncio.get_running_loop()
    tls_reader = asyncio.StreamReader(limit=_CHUNK)
    try:
        transport, protocol = await loop.connect_accepted_socket(
            lambda: asyncio.StreamReaderProtocol(tls_reader),
            sock,
            ssl=context,
            ssl_handshake_timeout=handshake_timeout_s,
        )
    except OSError as exc:  # ssl.SSLError, TimeoutError and ConnectionError are OSErrors
        log.debug("piece connection refused at the TLS handshake: %r", exc)
        sock.close()
        return
    tls_writer = asyncio.StreamWriter(transport, protocol, tls_reader, loop)
    inner, outer = socket.socketpair()
    inner.setblocking(False)
    try:
        plain_reader, plain_writer = await asyncio.open_connection(sock=outer, limit=_CHUNK)
    except BaseException:
        inner.close()
        outer.close()
        tls_writer.close()
        raise
    pumps = [
        asyncio.ensure_future(_pump(tls_reader, plain_writer)),
        asyncio.ensure_future(_pump(plain_reader, tls_writer)),
    ]
    try:
        await serve(inner)  # closes `inner` when done: the second pump sees EOF and closes the TLS side
        await asyncio.wait(pumps[1:], timeout=flush_timeout_s)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        plain_writer.close()
        tls_writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tls_writer.wait_closed(), 1.0)
