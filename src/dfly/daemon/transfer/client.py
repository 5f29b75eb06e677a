"""Child side of the piece protocol: `ParentConnection`, one per (child, parent, task).

Rules:
- An `asyncio.BufferedProtocol`: while a piece body is due and the decoder holds no bytes, the transport
  receives straight into that piece's pooled buffer (no StreamReader, no extra copy); control frames go
  through the decoder's own buffer. CRC-32 is computed over each slice as it arrives.
- `request(n)` first takes a buffer of the piece's length from the `BufferPool`, then sends REQUEST.
  Every request that was sent ends in exactly one `on_piece` or `on_piece_failed` (unless cancelled);
  on close, outstanding requests fail with "connection closed" before `on_closed` is called once.
- Buffers always go back to the pool: the listener hands each `on_piece` view back with
  `conn.release(data)` once the bytes are written (idempotent; valid after close too); on failure,
  cancel and close the connection releases buffers itself.
- A digest mismatch fails the piece ("digest mismatch"), tells the parent (ERROR `corrupt_piece`, so it
  reads its copy back) and closes the connection with DigestMismatch;
  a protocol error (including a PIECE that was never requested) closes it with ProtocolError.
- A PIECE for a request we cancelled may still arrive (the parent had started it): it is discarded.
- Listener callbacks run on the event loop, never before `connect_parent` has returned.
- With an `ssl_context` (`security.tls.pieces`) the connection is mTLS, the parent's certificate checked
  against the address dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Protocol

from dfly.common.digest import crc32
from dfly.common.errors import DigestMismatch, ProtocolError
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.buffers import BufferPool

log = logging.getLogger(__name__)
_SCRATCH_SIZE = 256 * 1024


class RemoteError(ProtocolError):
    """The parent sent ERROR (unknown_task, layout_mismatch, busy, shutdown, bad_frame, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"parent error {code}: {message}")
        self.code = code


class ParentListener(Protocol):
    def on_have(self, parent_id: str, pieces: list[int]) -> None:
        """Pieces the parent holds (from its BITFIELD, then each HAVE); may repeat a piece."""

    def on_piece(self, parent_id: str, number: int, offset: int, data: memoryview, digest: int) -> None:
        """A verified piece; `data` is valid until the listener calls `conn.release(data)`."""

    def on_piece_failed(self, parent_id: str, number: int, reason: str) -> None:
        """'not_available', 'digest mismatch' or 'connection closed'."""

    def on_closed(self, parent_id: str, error: Exception | None) -> None:
        """The connection is gone; `error` is None for a clean close by either side."""


@dataclass(eq=False)
class _Request:
    number: int
    length: int
    buf: bytearray | None = None
    sent: bool = False
    cancelled: bool = False


class ParentConnection(asyncio.BufferedProtocol):
    def __init__(
        self,
        *,
        parent_id: str,
        piece_length: int,
        content_length: int,
        listener: ParentListener,
        pool: BufferPool,
    ) -> None:
        self.parent_id = parent_id
        self.piece_length = piece_length
        self.content_length = content_length
        self.listener = listener
        self.pool = pool
        self.decoder = p.FrameDecoder("child", piece_length=piece_length, content_length=content_length)
        self.piece_count = p.piece_count_of(piece_length, content_length)
        self.parent_has = p.make_bitfield(self.piece_count)  # what the parent announced
        self.bytes_received = 0
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, _Request] = {}
        self._cancelled: set[int] = set()  # cancelled after REQUEST was sent: a PIECE may still come
        self._current: _Request | None = None  # body being received (buf None = discard)
        self._crc = 0
        self._pos = 0
        self._digest = 0
        self._scratch: bytearray | None = None
        self._delivered: dict[int, tuple[memoryview, bytearray]] = {}  # id(view) -> (view, buffer)
        self._direct = False
        self._handshake: asyncio.Future[p.Hello] = asyncio.get_running_loop().create_future()
        self._opened = False  # connect_parent returned: listener callbacks allowed
        self._closed = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def request(self, number: int, length: int | None = None) -> None:
        """Take a buffer for piece `number`, then send REQUEST; ConnectionError once closed.

        `length`, if given, must be the layout's length of that piece (a check, nothing more)."""
        if not 0 <= number < self.piece_count:
            raise ValueError(f"piece {number} out of range for {self.piece_count} pieces")
        _, expected = p.piece_span(number, self.piece_length, self.content_length)
        if length is not None and length != expected:
            raise ValueError(f"piece {number} has {expected} bytes, not {length}")
        if number in self._pending:
            raise ValueError(f"piece {number} already requested from {self.parent_id}")
        if self._closed:
            raise ConnectionError(f"connection to parent {self.parent_id} is closed")
        req = _Request(number, expected)
        self._pending[number] = req
        try:
            buf = await self.pool.acquire(expected)
        except BaseException:
            if self._pending.get(number) is req:
                del self._pending[number]
            raise
        if self._closed or req.cancelled or self._transport is None:
            self.pool.release(buf)
            if self._closed:
                raise ConnectionError(f"connection to parent {self.parent_id} is closed")
            return
        req.buf, req.sent = buf, True
        self._transport.write(p.encode_request(number))

    def cancel(self, number: int) -> None:
        """Drop a request; its buffer returns to the pool and no callback follows for it."""
        req = self._pending.pop(number, None)
        if req is None:
            return
        req.cancelled = True
        if req.buf is not None:
            self.pool.release(req.buf)
            req.buf = None
        if req is self._current:
            return  # its body is arriving: the rest is discarded
        if req.sent and self._transport is not None and not self._closed:
            self._cancelled.add(number)
            self._transport.write(p.encode_cancel(number))

    def release(self, data: memoryview) -> None:
        """Give back the buffer of a piece delivered by `on_piece` (idempotent)."""
        entry = self._delivered.pop(id(data), None)
        if entry is None or entry[0] is not data:
            try:
                data.obj  # noqa: B018 - raises ValueError once the view was released
            except ValueError:
                return  # released before: fine
            raise ValueError("release() takes the very memoryview passed to on_piece")
        with contextlib.suppress(BufferError):
            data.release()
        self.pool.release(entry[1])

    def close(self) -> None:
        self._shutdown(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)

    # ------------------------------------------------------------------------------ protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        cur = self._current
        self._direct = bool(cur is not None and self.decoder.body_remaining and not self.decoder.buffered)
        if not self._direct:
            return self.decoder.get_buffer()
        remaining = self.decoder.body_remaining
        if cur is not None and cur.buf is not None:
            return memoryview(cur.buf)[self._pos : self._pos + remaining]
        if self._scratch is None:
            self._scratch = bytearray(_SCRATCH_SIZE)
        return memoryview(self._scratch)[: min(remaining, _SCRATCH_SIZE)]

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed:
            return
        self.bytes_received += nbytes
        try:
            if self._direct:
                cur = self._current
                if cur is not None and cur.buf is not None:
                    self._crc = crc32(memoryview(cur.buf)[self._pos : self._pos + nbytes], self._crc)
                self._pos += nbytes
                self.decoder.body_received(nbytes)
            else:
                self.decoder.buffer_updated(nbytes)
            self._process()
        except Exception as exc:  # ProtocolError, DigestMismatch, or a listener bug
            if not isinstance(exc, ProtocolError | DigestMismatch):
                log.exception("piece connection to %s failed", self.parent_id)
            self._shutdown(exc)

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_handshake(exc or ConnectionError("parent closed during the handshake"))
        self._shutdown(exc)
        if not self._lost.done():
            self._lost.set_result(None)

    # -------------------------------------------------------------------------------------- internals
    def _opened_now(self) -> None:
        """Called by connect_parent once it is about to return: deliver what arrived meanwhile."""
        self._opened = True
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()
        asyncio.get_running_loop().call_soon(self._drain_after_open)

    def _drain_after_open(self) -> None:
        if not self._closed:
            try:
                self._process()
            except Exception as exc:
                self._shutdown(exc)

    def _process(self) -> None:
        while not self._closed:
            if not self._opened and self._handshake.done():
                return  # hold the rest until connect_parent has returned
            event = self.decoder.next_event()
            if isinstance(event, p.NeedData):
                return
            self._on_event(event)

    def _on_event(self, event: p.Event) -> None:
        if isinstance(event, p.Hello):
            if self._transport is not None:
                self._transport.pause_reading()
            self._handshake.set_result(event)
        elif isinstance(event, p.Bitfield):
            pieces = p.bitfield_pieces(event.bits, self.piece_count)
            self.parent_has[:] = event.bits
            self.listener.on_have(self.parent_id, pieces)
        elif isinstance(event, p.Have):
            p.set_bit(self.parent_has, self.piece_count, event.number)
            self.listener.on_have(self.parent_id, [event.number])
        elif isinstance(event, p.PieceHeader):
            self._start_piece(event)
        elif isinstance(event, p.BodyChunk):
            cur = self._current
            if cur is not None and cur.buf is not None:
                end = self._pos + len(event.data)
                cur.buf[self._pos : end] = event.data
                self._crc = crc32(event.data, self._crc)
            self._pos += len(event.data)
        elif isinstance(event, p.PieceEnd):
            self._finish_piece()
        elif isinstance(event, p.Error):
            self._on_error(event)
        elif isinstance(event, p.Closed):
            self._shutdown(None)

    def _start_piece(self, header: p.PieceHeader) -> None:
        req = self._pending.get(header.number)
        if req is None or not req.sent:
            if header.number not in self._cancelled:
                raise ProtocolError(f"parent sent piece {header.number}, which was not requested")
            self._cancelled.discard(header.number)
            req = _Request(header.number, header.length, cancelled=True)  # discard its body
        self._current, self._crc, self._pos, self._digest = req, 0, 0, header.digest

    def _finish_piece(self) -> None:
        req, self._current = self._current, None
        if req is None or req.cancelled or req.buf is None:
            return
        del self._pending[req.number]
        buf, req.buf = req.buf, None
        if self._crc & 0xFFFFFFFF != self._digest:
            self.pool.release(buf)
            self.listener.on_piece_failed(self.parent_id, req.number, "digest mismatch")
            if self._transport is not None:  # the parent reads its copy back; the close follows
                report = f"piece {req.number} fails its CRC-32"
                self._transport.write(p.encode_error("corrupt_piece", report, req.number))
            raise DigestMismatch(f"piece {req.number} from parent {self.parent_id} fails its CRC-32")
        view = memoryview(buf)
        self._delivered[id(view)] = (view, buf)
        offset = req.number * self.piece_length
        try:
            self.listener.on_piece(self.parent_id, req.number, offset, view, self._digest)
        except BaseException:
            self.release(view)
            raise

    def _on_error(self, error: p.Error) -> None:
        if error.code != "not_available" or error.piece is None:
            raise RemoteError(error.code, error.message)
        req = self._pending.get(error.piece)
        if req is not None and req.sent:
            del self._pending[error.piece]
            if req.buf is not None:
                self.pool.release(req.buf)
                req.buf = None
            self.listener.on_piece_failed(self.parent_id, error.piece, "not_available")
        elif error.piece in self._cancelled:
            self._cancelled.discard(error.piece)
        else:
            raise ProtocolError(f"parent answered not_available for piece {error.piece}, never requested")

    def _fail_handshake(self, error: Exception) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(error)
            self._handshake.exception()  # connect_parent may have stopped waiting: no "never retrieved"

    def _shutdown(self, error: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        self._fail_handshake(error or ConnectionError("connection closed during the handshake"))
        pending = list(self._pending.values())
        self._pending.clear()
        self._current = None
        for req in pending:
            if req.buf is not None:
                self.pool.release(req.buf)
                req.buf = None
        if not self._opened:
            return
        for req in pending:
            if req.sent:
                self.listener.on_piece_failed(self.parent_id, req.number, "connection closed")
        self.listener.on_closed(self.parent_id, error)


async def connect_parent(
    ip: str,
    port: int,
    *,
    task_id: str,
    peer_id: str,
    piece_length: int,
    content_length: int,
    parent_id: str,
    listener: ParentListener,
    pool: BufferPool,
    connect_timeout_s: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> ParentConnection:
    """Connect and exchange HELLO; raises RemoteError (e.g. unknown_task), ProtocolError, OSError or
    TimeoutError. Listener callbacks start after this returns."""
    loop = asyncio.get_running_loop()
    conn = ParentConnection(
        parent_id=parent_id,
        piece_length=piece_length,
        content_length=content_length,
        listener=listener,
        pool=pool,
    )
    try:
        async with asyncio.timeout(connect_timeout_s):
            await loop.create_connection(
                lambda: conn, ip, port, ssl=ssl_context, server_hostname=ip if ssl_context else None
            )
            assert conn._transport is not None
            conn._transport.write(p.encode_hello(task_id, peer_id, piece_length, content_length))
            await conn._handshake
    except BaseException:
        conn._shutdown(None)
        raise
    conn._opened_now()
    return conn
