"""Piece transfer over real sockets: a PieceServer on 127.0.0.1:0 serving a temp file, ParentConnection
children fetching from it. Tests wait on listener events, never on sleeps."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dfly.common.errors import DigestMismatch, ProtocolError
from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.client import ParentConnection, RemoteError, connect_parent
from dfly.daemon.transfer.ratelimit import TokenBucket
from dfly.daemon.transfer.server import PieceServer, ServedTask

pytestmark = pytest.mark.integration
KiB = 1024
MiB = 1024 * KiB
_OPEN_FDS: list[int] = []


@pytest.fixture(autouse=True)
def _close_task_fds() -> Iterator[None]:
    yield
    while _OPEN_FDS:
        os.close(_OPEN_FDS.pop())


class FileTask:
    """A tiny ServedTask over a real file; pieces become available when the test says so."""

    def __init__(self, path: Path, task_id: str, piece_length: int, available: Iterable[int] | None = None):
        self.task_id = task_id
        self.piece_length = piece_length
        self.content_length = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)
        _OPEN_FDS.append(self.fd)
        self.digests: dict[int, int] = {}
        with path.open("rb") as f:
            for n in range(self.piece_count):
                self.digests[n] = zlib.crc32(f.read(piece_length))
        self.available = set(range(self.piece_count) if available is None else available)
        self.subscribers: list[Callable[[int], None]] = []
        self.gate: FirstPassGate | None = None
        self.child_holds: dict[str, set[int]] = {}  # what peer_has reports (the child is also our parent)

    @property
    def first_pass(self) -> FirstPassGate | None:
        return self.gate

    def peer_has(self, peer_id: str, number: int) -> bool:
        return number in self.child_holds.get(peer_id, set())

    @property
    def piece_count(self) -> int:
        return p.piece_count_of(self.piece_length, self.content_length)

    def available_pieces(self) -> Iterable[int]:
        return sorted(self.available)

    def piece_digest(self, number: int) -> int | None:
        return self.digests[number] if number in self.available else None

    def read_fd(self) -> int:
        return self.fd

    def subscribe(self, on_available: Callable[[int], None]) -> Callable[[], None]:
        self.subscribers.append(on_available)
        return lambda: self.subscribers.remove(on_available)

    def make_available(self, number: int) -> None:
        self.available.add(number)
        for callback in list(self.subscribers):
            callback(number)


class Provider:
    def __init__(self, *tasks: FileTask) -> None:
        self.tasks = {t.task_id: t for t in tasks}

    def lookup(self, task_id: str) -> ServedTask | None:
        return self.tasks.get(task_id)


class Recorder:
    """ParentListener that logs events into a queue and optionally copies pieces into `sink`."""

    def __init__(self, sink: bytearray | None = None) -> None:
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.sink = sink
        self.have: set[int] = set()
        self.received = 0
        self.conn: ParentConnection | None = None

    def on_have(self, parent_id: str, pieces: list[int]) -> None:
        self.have.update(pieces)
        self.queue.put_nowait(("have", pieces))

    def on_piece(self, parent_id: str, number: int, offset: int, data: memoryview, digest: int) -> None:
        assert zlib.crc32(data) == digest
        if self.sink is not None:
            self.sink[offset : offset + len(data)] = data
        self.received += len(data)
        assert self.conn is not None  # callbacks start only after connect_parent returned
        self.conn.release(data)
        self.queue.put_nowait(("piece", number, digest))

    def on_piece_failed(self, parent_id: str, number: int, reason: str) -> None:
        self.queue.put_nowait(("failed", number, reason))

    def on_closed(self, parent_id: str, error: Exception | None) -> None:
        self.queue.put_nowait(("closed", error))

    async def expect(self, kind: str) -> tuple[Any, ...]:
        while True:
            event = await self.queue.get()
            if event[0] == kind:
                return event
            assert event[0] == "have", f"expected {kind}, got {event}"


async def uploaded(server: PieceServer, task_id: str, nbytes: int, timeout_s: float = 10.0) -> None:
    """Wait until the server has counted `nbytes` uploaded for the task (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while server.bytes_uploaded_by_task.get(task_id, 0) < nbytes:
        assert asyncio.get_running_loop().time() < deadline, server.bytes_uploaded_by_task
        await asyncio.sleep(0.01)


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout_s))


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def start(task: FileTask, rate: int = 0, burst: int | None = None) -> tuple[PieceServer, int]:
    server = PieceServer(Provider(task), "parent-peer", TokenBucket(rate, burst))
    return server, await server.start("127.0.0.1", 0)


async def connect(
    port: int, task: FileTask, listener: Recorder, pool: BufferPool | None = None, **layout: int
) -> ParentConnection:
    listener.conn = await connect_parent(
        "127.0.0.1", port, task_id=task.task_id, peer_id="child-peer",
        piece_length=layout.get("piece_length", task.piece_length),
        content_length=layout.get("content_length", task.content_length),
        parent_id="parent-peer", listener=listener, pool=pool or BufferPool(32 * MiB), connect_timeout_s=5.0,
    )  # fmt: skip
    return listener.conn


async def fetch_all(conn: ParentConnection, rec: Recorder, count: int, depth: int = 2) -> None:
    done = 0
    for n in range(count):
        if n >= depth:
            await rec.expect("piece")
            done += 1
        await conn.request(n)
    while done < count:
        await rec.expect("piece")
        done += 1


def test_fetch_all_pieces_of_8mib(tmp_path: Path) -> None:
    data = make_file(tmp_path / "f", 8 * MiB + 12345)
    task = FileTask(tmp_path / "f", "t1", 512 * KiB)

    async def main() -> None:
        server, port = await start(task)
        sink = bytearray(len(data))
        rec = Recorder(sink)
        pool = BufferPool(4 * MiB)
        conn = await connect(port, task, rec, pool)
        await fetch_all(conn, rec, task.piece_count)
        assert rec.have == set(range(task.piece_count))
        assert sink == data
        await uploaded(server, "t1", len(data))  # counted once each upload thread returned
        assert server.connections_open == 1
        assert pool.bytes_out == 0
        conn.close()
        assert await rec.expect("closed") == ("closed", None)
        await server.close()
        # Uploads are counted when the sending thread returns, which may be after the child has the bytes.
        assert server.bytes_uploaded == len(data)
        assert server.bytes_uploaded_by_task == {"t1": len(data)}

    run(main())


def test_have_pushed_and_not_available(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB, available=[0])

    async def main() -> None:
        server, port = await start(task)
        rec = Recorder()
        conn = await connect(port, task, rec)
        assert await rec.expect("have") == ("have", [0])
        await conn.request(2)
        assert await rec.expect("failed") == ("failed", 2, "not_available")
        started = time.perf_counter()
        task.make_available(2)
        assert await rec.expect("have") == ("have", [2])
        print(f"HAVE latency {1000 * (time.perf_counter() - started):.2f} ms")
        await conn.request(2)  # the connection is still usable
        assert await rec.expect("piece") == ("piece", 2, task.digests[2])
        await server.close()
        event = await rec.expect("closed")
        assert isinstance(event[1], RemoteError)
        assert event[1].code == "shutdown"

    run(main())


def test_no_have_for_a_piece_the_child_is_known_to_hold(tmp_path: Path) -> None:
    """A child that is also this daemon's parent announced piece 1 to us: no HAVE 1 goes to it."""
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB, available=[])
    task.child_holds["child-peer"] = {1}

    async def main() -> None:
        server, port = await start(task)
        rec = Recorder()
        await connect(port, task, rec)
        assert await rec.expect("have") == ("have", [])  # the BITFIELD
        task.make_available(1)
        task.make_available(3)
        assert await rec.expect("have") == ("have", [3])  # 1 was skipped, 3 follows it on the wire
        task.make_available(2)
        assert await rec.expect("have") == ("have", [2])
        await server.close()

    run(main())


def test_corrupt_digest_is_reported(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)
    task.digests[1] ^= 1
    pool = BufferPool(MiB)

    async def main() -> None:
        server, port = await start(task)
        rec = Recorder()
        conn = await connect(port, task, rec, pool)
        await conn.request(0)
        await conn.request(1)
        assert await rec.expect("piece") == ("piece", 0, task.digests[0])
        assert await rec.expect("failed") == ("failed", 1, "digest mismatch")
        event = await rec.expect("closed")
        assert isinstance(event[1], DigestMismatch)
        assert conn.closed
        assert pool.bytes_out == 0
        with pytest.raises(ConnectionError):
            await conn.request(2)
        await server.close()

    run(main())


def test_unknown_task_and_layout_mismatch(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)
    other = FileTask(tmp_path / "f", "t2", 256 * KiB)

    async def main() -> None:
        server, port = await start(task)
        with pytest.raises(RemoteError) as info:
            await connect(port, task, Recorder(), piece_length=128 * KiB)
        assert info.value.code == "layout_mismatch"
        with pytest.raises(RemoteError) as info:
            await connect(port, other, Recorder())
        assert info.value.code == "unknown_task"
        await server.close()

    run(main())


def test_cancel_returns_buffers_and_connection_stays_usable(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 4 * MiB)
    task = FileTask(tmp_path / "f", "t1", 1 * MiB)
    pool = BufferPool(8 * MiB)

    async def main() -> None:
        server, port = await start(task, rate=8 * MiB, burst=64 * KiB)  # slow: requests stay queued
        rec = Recorder()
        conn = await connect(port, task, rec, pool)
        for n in range(3):
            await conn.request(n)
        conn.cancel(1)
        conn.cancel(2)
        assert await rec.expect("piece") == ("piece", 0, task.digests[0])
        await conn.request(3)
        assert await rec.expect("piece") == ("piece", 3, task.digests[3])
        assert rec.queue.empty()
        assert pool.bytes_out == 0
        assert conn.outstanding == 0
        await server.close()

    run(main())


def test_bad_client_gets_bad_frame_and_server_survives(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)

    async def main() -> None:
        server, port = await start(task)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x09\x00\x00\x00\x00garbage")
        reply = await reader.read()  # until the server closes
        dec = p.FrameDecoder("child", piece_length=1, content_length=1)
        dec.receive_data(reply)
        event = dec.next_event()
        assert isinstance(event, p.Error)
        assert event.code == "bad_frame"
        writer.close()
        rec = Recorder()
        conn = await connect(port, task, rec)
        await conn.request(0)
        await rec.expect("piece")
        await server.close()

    run(main())


def test_unrequested_piece_is_a_protocol_error() -> None:
    async def fake_parent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(p.encode_hello("t1", "evil", 1024, 4096) + p.encode_bitfield(p.make_bitfield(4, [0])))
        writer.write(p.encode_piece_header(0, 0, 1024, 0) + bytes(1024))
        await writer.drain()
        await reader.read()
        writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(fake_parent, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        rec = Recorder()
        await connect_parent(
            "127.0.0.1", port, task_id="t1", peer_id="c", piece_length=1024, content_length=4096,
            parent_id="evil", listener=rec, pool=BufferPool(MiB),
        )  # fmt: skip
        event = await rec.expect("closed")
        assert isinstance(event[1], ProtocolError)
        assert "not requested" in str(event[1])
        srv.close()
        await srv.wait_closed()

    run(main())


def test_rate_limit_slows_transfer(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 4 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)

    async def timed(rate: int) -> float:
        server, port = await start(task, rate=rate, burst=256 * KiB)
        rec = Recorder()
        conn = await connect(port, task, rec)
        started = time.perf_counter()
        await fetch_all(conn, rec, task.piece_count)
        elapsed = time.perf_counter() - started
        conn.close()
        await server.close()
        return elapsed

    async def main() -> None:
        unlimited = await timed(0)
        limited = await timed(8 * MiB)
        print(f"4 MiB: unlimited {unlimited:.3f} s, at 8 MiB/s {limited:.3f} s")
        assert limited >= 0.4  # 3.75 MiB beyond the burst at 8 MiB/s is 0.47 s at least
        assert limited > 3 * unlimited

    run(main())


def test_loopback_throughput_256mib(tmp_path: Path) -> None:
    size = 256 * MiB
    path = tmp_path / "big"
    with path.open("wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
    task = FileTask(path, "big", 4 * MiB)
    started = time.perf_counter()
    shutil.copyfile(path, tmp_path / "copy")
    copy_s = time.perf_counter() - started

    async def main() -> None:
        server, port = await start(task)
        rec = Recorder()
        conn = await connect(port, task, rec, BufferPool(32 * MiB))
        began = time.perf_counter()
        await fetch_all(conn, rec, task.piece_count, depth=3)
        elapsed = time.perf_counter() - began
        assert rec.received == size
        print(
            f"256 MiB over loopback in {elapsed:.3f} s ({size / MiB / elapsed:.0f} MiB/s, CRC verified); "
            f"plain file copy {copy_s:.3f} s"
        )
        conn.close()
        await server.close()

    run(main(), timeout_s=120)


def test_first_pass_gate_gives_each_piece_once_then_releases_after_its_hold(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 768 * KiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)  # 3 pieces

    async def main() -> None:
        held = asyncio.Event()
        gate = task.gate = FirstPassGate(task.piece_count, on_given_out=held.set)  # the test releases it
        server, port = await start(task)
        first, second = Recorder(), Recorder()
        conn1 = await connect(port, task, first)
        conn2 = await connect(port, task, second)
        await conn1.request(0)
        assert await first.expect("piece") == ("piece", 0, task.digests[0])
        await conn2.request(0)  # already given to the first child
        assert await second.expect("failed") == ("failed", 0, "not_available")
        await conn2.request(1)
        assert await second.expect("piece") == ("piece", 1, task.digests[1])
        await conn1.request(2)  # the last unclaimed piece: every piece is given out, the hold starts
        assert await first.expect("piece") == ("piece", 2, task.digests[2])
        assert gate.given_out
        assert not gate.released
        await held.wait()
        await conn2.request(2)  # during the hold: still once only
        assert await second.expect("failed") == ("failed", 2, "not_available")
        gate.release()
        told = [*(await second.expect("have"))[1], *(await second.expect("have"))[1]]
        assert sorted(told) == [0, 2]  # told again at release, one HAVE per piece
        assert gate.released
        await conn2.request(0)
        assert await second.expect("piece") == ("piece", 0, task.digests[0])
        # the child can have every byte before the server's upload thread returns and counts it
        await uploaded(server, "t1", 4 * 256 * KiB)  # one piece twice, after release
        await server.close()
        assert server.bytes_uploaded_by_task == {"t1": 4 * 256 * KiB}

    run(main())


def test_after_release_a_piece_goes_to_one_child_at_a_time(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 768 * KiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)  # 3 pieces

    async def main() -> None:
        gate = task.gate = FirstPassGate(task.piece_count)
        gate.release()  # as after the first pass and its hold
        # rate 1 byte/s with a one-piece burst: after piece 0, a piece waits for tokens and is never sent
        server, port = await start(task, rate=1, burst=256 * KiB)
        first, second = Recorder(), Recorder()
        conn1 = await connect(port, task, first)
        conn2 = await connect(port, task, second)
        await conn1.request(0)
        assert await first.expect("piece") == ("piece", 0, task.digests[0])
        await conn1.request(1)  # its copy waits for tokens
        await conn2.request(1)  # one copy at a time: refused for now
        assert await second.expect("failed") == ("failed", 1, "not_available")
        conn1.close()  # the copy is handed back: the refused child hears of piece 1 again
        assert await second.expect("have") == ("have", [1])
        await server.close()
        del conn2

    run(main())


def test_first_pass_claim_is_handed_back_when_the_child_leaves(tmp_path: Path) -> None:
    make_file(tmp_path / "f", 768 * KiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)  # 3 pieces

    class WatchedGate(FirstPassGate):
        """Sets `handed_back` when a claim comes back (the server does it on its own loop)."""

        def __init__(self, piece_count: int) -> None:
            super().__init__(piece_count)
            self.handed_back = asyncio.Event()

        def unclaim(self, number: int) -> None:
            super().unclaim(number)
            self.handed_back.set()

    async def main() -> None:
        gate = task.gate = WatchedGate(task.piece_count)
        # rate 1 byte/s with a one-piece burst: the second request waits for tokens and is never sent
        server, port = await start(task, rate=1, burst=256 * KiB)
        first, second = Recorder(), Recorder()
        conn1 = await connect(port, task, first)
        await conn1.request(0)
        assert await first.expect("piece") == ("piece", 0, task.digests[0])
        await conn1.request(1)  # claimed, waits for tokens
        conn1.close()
        assert await first.expect("failed") == ("failed", 1, "connection closed")
        conn2 = await connect(port, task, second)
        await gate.handed_back.wait()  # bounded by run()'s timeout
        assert gate.unclaimed == 2  # piece 1 was never sent
        await conn2.request(0)
        assert await second.expect("failed") == ("failed", 0, "not_available")
        await server.close()
        del conn2

    run(main())


def test_child_disconnecting_mid_piece_leaves_the_server_serving(tmp_path: Path) -> None:
    """A child that asks for a 16 MiB piece (more than the socket buffers hold) and resets the connection
    after a few bytes: the upload ends, its slot and connection are freed, the next child gets it all."""
    make_file(tmp_path / "f", 32 * MiB)
    task = FileTask(tmp_path / "f", "t1", 16 * MiB)

    async def main() -> None:
        server, port = await start(task)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(p.encode_hello(task.task_id, "rude-child", task.piece_length, task.content_length))
        writer.write(p.encode_request(1))
        await reader.readexactly(64)  # HELLO, BITFIELD and the start of the piece
        assert server.active_uploads == 1  # sendfile is blocked on the full socket
        writer.transport.abort()  # RST, in the middle of the body
        for _ in range(200):
            if server.connections_open == 0 and server.active_uploads == 0:
                break
            await asyncio.sleep(0.05)
        assert server.connections_open == 0
        assert server.active_uploads == 0
        rec = Recorder()
        conn = await connect(port, task, rec)
        await fetch_all(conn, rec, 2)
        await server.close()

    run(main())
