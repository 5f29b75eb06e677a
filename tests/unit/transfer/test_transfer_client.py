"""ParentConnection driven through a fake transport: cancel paths, buffer accounting, close semantics."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.client import ParentConnection

PL = 1000
CL = 3500  # 4 pieces, the last one 500 bytes
COUNT = 4


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.sent += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.keep: list[memoryview] = []  # pieces the test holds back
        self.hold = False
        self.conn: ParentConnection | None = None

    def on_have(self, parent_id: str, pieces: list[int]) -> None:
        self.events.append(("have", pieces))

    def on_piece(self, parent_id: str, number: int, offset: int, data: memoryview, digest: int) -> None:
        self.events.append(("piece", number, offset, bytes(data)))
        assert self.conn is not None
        if self.hold:
            self.keep.append(data)
        else:
            self.conn.release(data)

    def on_piece_failed(self, parent_id: str, number: int, reason: str) -> None:
        self.events.append(("failed", number, reason))

    def on_closed(self, parent_id: str, error: Exception | None) -> None:
        self.events.append(("closed", type(error).__name__ if error else None))


def body(n: int) -> bytes:
    offset, length = p.piece_span(n, PL, CL)
    return bytes((offset + i) % 251 for i in range(length))


def piece(n: int, digest: int | None = None) -> bytes:
    offset, length = p.piece_span(n, PL, CL)
    data = body(n)
    return p.encode_piece_header(n, offset, length, zlib.crc32(data) if digest is None else digest) + data


def feed(conn: ParentConnection, data: bytes, step: int = 10_000) -> None:
    while data:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(data), step)
        buf[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


Scenario = Callable[[ParentConnection, FakeTransport, Log, BufferPool], Coroutine[Any, Any, None]]


def run(scenario: Scenario, have: list[int] | None = None) -> None:
    async def main() -> None:
        log, pool, transport = Log(), BufferPool(10 * PL), FakeTransport()
        conn = ParentConnection(parent_id="par", piece_length=PL, content_length=CL, listener=log, pool=pool)
        conn.connection_made(transport)
        log.conn = conn
        bits = p.make_bitfield(COUNT, range(COUNT) if have is None else have)
        feed(conn, p.encode_hello("t", "par", PL, CL) + p.encode_bitfield(bits) + p.encode_have(3))
        await conn._handshake
        assert transport.paused
        assert log.events == []  # nothing reaches the listener before connect_parent returns
        conn._opened_now()
        await asyncio.sleep(0)
        assert log.events[-1] == ("have", [3])
        log.events.clear()
        transport.sent.clear()
        await scenario(conn, transport, log, pool)

    asyncio.run(main())


def test_piece_fed_byte_by_byte() -> None:
    async def scenario(conn: ParentConnection, t: FakeTransport, log: Log, pool: BufferPool) -> None:
        with pytest.raises(ValueError, match="has 500 bytes"):
            await conn.request(3, PL)
        await conn.request(3, 500)
        assert bytes(t.sent) == p.encode_request(3)
        feed(conn, piece(3), step=1)
        assert log.events == [("piece", 3, 3 * PL, body(3))]
        assert pool.bytes_out == 0

    run(scenario, have=[])


def test_cancel_while_body_arrives_discards_it() -> None:
    async def scenario(conn: ParentConnection, t: FakeTransport, log: Log, pool: BufferPool) -> None:
        await conn.request(0)
        await conn.request(1)
        data = piece(0)
        feed(conn, data[:300])
        conn.cancel(0)
        assert pool.bytes_out == PL  # piece 1's buffer only
        feed(conn, data[300:] + piece(1))
        assert log.events == [("piece", 1, PL, body(1))]
        assert pool.bytes_out == 0

    run(scenario)


def test_piece_of_cancelled_request_is_discarded() -> None:
    async def scenario(conn: ParentConnection, t: FakeTransport, log: Log, pool: BufferPool) -> None:
        await conn.request(2)
        conn.cancel(2)
        assert t.sent.endswith(p.encode_cancel(2))
        assert pool.bytes_out == 0
        feed(conn, piece(2))  # the parent had already started it
        await conn.request(2)
        feed(conn, piece(2))
        assert log.events == [("piece", 2, 2 * PL, body(2))]
        assert not conn.closed

    run(scenario)


def test_close_fails_outstanding_and_releases_buffers() -> None:
    async def scenario(conn: ParentConnection, t: FakeTransport, log: Log, pool: BufferPool) -> None:
        log.hold = True
        await conn.request(0)
        await conn.request(1)
        await conn.request(3)
        feed(conn, piece(0) + piece(1)[:50])
        assert pool.bytes_out == 3 * PL - 500  # 0 held by the listener, 1 and 3 in flight
        conn.connection_lost(None)
        assert log.events[1:] == [("failed", 1, "connection closed"), ("failed", 3, "connection closed"),
                                  ("closed", None)]  # fmt: skip
        assert pool.bytes_out == PL
        conn.release(log.keep[0])
        conn.release(log.keep[0])  # idempotent, also after close
        assert pool.bytes_out == 0
        with pytest.raises(ValueError, match="very memoryview"):
            conn.release(memoryview(bytearray(3)))
        with pytest.raises(ConnectionError):
            await conn.request(2)

    run(scenario)


def test_request_waits_for_buffer_and_cancel_during_wait() -> None:
    async def scenario(conn: ParentConnection, t: FakeTransport, log: Log, pool: BufferPool) -> None:
        hog = await pool.acquire(10 * PL)
        waiting = asyncio.ensure_future(conn.request(1))
        await asyncio.sleep(0)
        conn.cancel(1)
        pool.release(hog)
        await waiting
        assert t.sent == b""  # never sent
        assert pool.bytes_out == 0
        with pytest.raises(ValueError, match="out of range"):
            await conn.request(COUNT)

    run(scenario)


@pytest.mark.parametrize(
    ("data", "error", "failed"),
    [
        (piece(1), "ProtocolError", None),  # never requested
        (p.encode_error("not_available", "x", piece=2), "ProtocolError", None),
        (p.encode_error("shutdown", "bye"), "RemoteError", None),
        (piece(0, digest=1), "DigestMismatch", ("failed", 0, "digest mismatch")),
        (p.encode_have(COUNT), "ProtocolError", None),
    ],
)
def test_errors_close_the_connection(data: bytes, error: str, failed: tuple[Any, ...] | None) -> None:
    async def scenario(conn: ParentConnection, t: FakeTransport, log: Log, pool: BufferPool) -> None:
        await conn.request(0)
        feed(conn, data)
        assert conn.closed
        assert t.closing
        expected = [failed or ("failed", 0, "connection closed"), ("closed", error)]
        assert log.events == expected
        assert pool.bytes_out == 0

    run(scenario)
