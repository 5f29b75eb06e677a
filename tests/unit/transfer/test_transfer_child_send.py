"""ChildConnection's frame sending and reading, on a socket pair: a frame the socket takes at once is
one send; a frame larger than the socket's room still arrives whole and in order; a child that takes
nothing is given up after the stall timeout; the reader callback applies requests and ends on EOF or a
protocol error."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest

from dfly.common.errors import ProtocolError
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.connection import ChildConnection


def _connection(stall_s: float = 5.0, sndbuf: int | None = None) -> tuple[ChildConnection, socket.socket]:
    """(the connection on our end, the child's end); both non-blocking."""
    ours, child = socket.socketpair()
    ours.setblocking(False)
    child.setblocking(False)
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    server: Any = SimpleNamespace(stall_timeout_s=stall_s, max_queued_requests=64)
    return ChildConnection(server, ours), child


async def _after_hello(conn: ChildConnection, child: socket.socket) -> None:
    child.send(p.encode_hello("t1", "child-1", 256 * 1024, 1024 * 1024))
    events = await conn._recv_events()
    assert isinstance(events[0], p.Hello)


async def _read_exactly(sock: socket.socket, count: int, pause_s: float = 0.0) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < count:
        chunk = await loop.sock_recv(sock, 1 << 14)
        if not chunk:
            break
        got += chunk
        if pause_s:
            await asyncio.sleep(pause_s)  # a slow reader, so the sender's socket fills
    return bytes(got)


def test_a_frame_larger_than_the_socket_room_arrives_whole() -> None:
    async def main() -> None:
        conn, child = _connection(sndbuf=4096)
        data = os.urandom(2 * 1024 * 1024)
        reader = asyncio.ensure_future(_read_exactly(child, len(data), pause_s=0.0005))
        await conn._send(data)
        assert not conn.mid_frame
        assert await reader == data
        conn.sock.close()
        child.close()

    asyncio.run(main())


def test_a_small_frame_is_sent_at_once() -> None:
    async def main() -> None:
        conn, child = _connection()
        await conn._send(b"frame")
        assert child.recv(16) == b"frame"  # already there: no loop turn was needed
        conn.sock.close()
        child.close()

    asyncio.run(main())


def test_a_child_that_takes_nothing_is_given_up_after_the_stall_timeout() -> None:
    async def main() -> None:
        conn, child = _connection(stall_s=0.3, sndbuf=4096)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn._send(os.urandom(4 * 1024 * 1024))
        assert time.monotonic() - started < 5
        assert conn.mid_frame  # so no best-effort ERROR frame is written into the middle of this one
        conn.sock.close()
        child.close()

    asyncio.run(main())


def test_the_reader_applies_requests_and_ends_on_eof() -> None:
    async def main() -> None:
        conn, child = _connection()
        await _after_hello(conn, child)
        reader = asyncio.ensure_future(conn._reader())
        child.send(p.encode_request(1) + p.encode_request(3))
        await asyncio.wait_for(conn.wake.wait(), 5)  # the writer is woken for the requests
        child.send(p.encode_cancel(1) + p.encode_request(2))
        child.close()
        await asyncio.wait_for(reader, 5)  # EOF ends it without an error, after every frame before it
        assert list(conn.queue) == [3, 2]
        conn.sock.close()

    asyncio.run(main())


def test_the_reader_ends_with_the_childs_protocol_error() -> None:
    async def main() -> None:
        conn, child = _connection()
        await _after_hello(conn, child)
        reader = asyncio.ensure_future(conn._reader())
        child.send(b"\xff" * 64)  # no such frame type
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(reader, 5)
        conn.sock.close()
        child.close()

    asyncio.run(main())
