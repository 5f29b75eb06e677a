"""Piece transfer over real sockets: a PieceServer on 127.0.0.1:0 serving a temp file, ParentConnection
children fetching from it (transfer_kit.py). Tests wait on listener events, never on sleeps."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from transfer_kit import (
    FileTask,
    KiB,
    MiB,
    Provider,
    Recorder,
    connect,
    fetch_all,
    make_file,
    released,
    run,
    start,
    uploaded,
)
from transfer_kit import close_task_fds as close_task_fds  # autouse: closes the tasks' fds

from dfly.common.errors import DigestMismatch, ProtocolError
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.client import ParentConnection, RemoteError, connect_parent
from dfly.daemon.transfer.ratelimit import TokenBucket
from dfly.daemon.transfer.server import PieceServer

pytestmark = pytest.mark.integration


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
        await released(task)  # the parent read the child's ERROR and closed
        assert task.reported_corrupt == [1]  # it reads its copy of piece 1 back
        await server.close()

    run(main())


def test_a_corrupt_report_counts_only_for_a_piece_sent_on_that_connection(tmp_path: Path) -> None:
    """A child cannot make the parent read back pieces it was never sent."""
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)

    async def main() -> None:
        server, port = await start(task)
        for number in (2, 99, -1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(p.encode_hello("t1", "liar", 256 * KiB, MiB))
            writer.write(p.encode_error("corrupt_piece", "not true", number if number >= 0 else None))
            await writer.drain()
            await reader.read()  # the parent closes after the ERROR
            writer.close()
        await released(task)
        assert task.reported_corrupt == []
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


def test_the_server_keeps_child_connections_alive_with_tcp_keepalive(tmp_path: Path) -> None:
    """A child that vanishes without a FIN (power loss) must not hold its task forever: the server's side
    of every connection probes after 60 s idle (iproute2's `ss` shows the keepalive timer)."""
    make_file(tmp_path / "f", 256 * KiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)

    async def main() -> None:
        server, port = await start(task)
        conn = await connect(port, task, Recorder())
        assert task.holders == 1  # the connected child holds the task
        argv = ["ss", "-Htno", "state", "established", f"( sport = :{port} )"]
        shown = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, check=True)
        assert "timer:(keepalive," in shown.stdout, shown.stdout
        conn.close()
        await conn.wait_closed()
        await server.close()
        assert task.holders == 0

    run(main())


def test_a_piece_keeps_its_file_when_the_tasks_fd_is_replaced_mid_piece(tmp_path: Path) -> None:
    """A task removed mid-piece closes its cached fd, and the kernel may give that number to another file
    at once: the piece being sent must still carry the task's own bytes (dup2 makes the reuse certain)."""
    data = make_file(tmp_path / "f", 32 * MiB)
    make_file(tmp_path / "other", 32 * MiB)
    task = FileTask(tmp_path / "f", "t1", 16 * MiB)

    async def main() -> None:
        server, port = await start(task)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)  # no autotuning: little in flight
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(p.encode_hello(task.task_id, "child", task.piece_length, task.content_length))
        writer.write(p.encode_request(1))
        dec = p.FrameDecoder("child", piece_length=task.piece_length, content_length=task.content_length)
        body = bytearray()
        header_seen = False
        while len(body) < task.piece_length:
            event = dec.next_event()
            if isinstance(event, p.NeedData):
                chunk = await reader.read(64 * KiB)
                assert chunk, "the parent closed the connection mid-piece"
                dec.receive_data(chunk)
            elif isinstance(event, p.PieceHeader) and not header_seen:  # its fd was taken before its header
                header_seen = True
                assert server.active_uploads == 1  # 16 MiB do not fit the socket buffers: most is unsent
                other = os.open(tmp_path / "other", os.O_RDONLY)
                os.dup2(other, task.fd)  # the task's fd number now names another file
                os.close(other)
            elif isinstance(event, p.BodyChunk):
                body += event.data
        assert body == data[16 * MiB :]
        writer.close()
        await server.close()

    run(main())


def test_a_cancel_while_the_piece_waits_for_tokens_charges_nothing(tmp_path: Path) -> None:
    """Piece 1 is the one the parent is about to send, waiting for upload tokens, when the child cancels
    it: the wait ends and the tokens go back, so piece 2 comes as soon as it would have without piece 1
    (it used to wait out piece 1's tokens too: an endgame CANCEL cost every child that bandwidth)."""
    make_file(tmp_path / "f", 4 * MiB)
    task = FileTask(tmp_path / "f", "t1", 1 * MiB)

    async def time_to_piece_2(cancel_piece_1: bool) -> float:
        server, port = await start(task, rate=2 * MiB, burst=64 * KiB)
        rec = Recorder()
        conn = await connect(port, task, rec, BufferPool(8 * MiB))
        started = time.perf_counter()
        await conn.request(0)
        if cancel_piece_1:
            await conn.request(1)
        assert (await rec.expect("piece"))[1] == 0
        if cancel_piece_1:
            conn.cancel(1)  # by now the parent's writer holds it, waiting for piece 0's debt to clear
        await conn.request(2)
        assert (await rec.expect("piece"))[1] == 2
        elapsed = time.perf_counter() - started
        conn.close()
        await server.close()
        return elapsed

    async def main() -> None:
        alone = await time_to_piece_2(cancel_piece_1=False)
        cancelled = await time_to_piece_2(cancel_piece_1=True)
        print(f"piece 2 after {alone:.2f} s alone, {cancelled:.2f} s with piece 1 cancelled")
        assert cancelled < 1.3 * alone  # 2 MiB/s: ~1 s either way; charged for piece 1 it was ~1.5 s

    run(main())


def test_children_that_do_not_read_leave_the_upload_threads_to_the_others(tmp_path: Path) -> None:
    """Pieces over 1 MiB are copied by the server's four upload threads. A thread used to wait on its
    child's full socket for as long as the child took a little every minute: four such children stopped
    every other child's large pieces (the honest child below waited 59 s for its piece)."""
    make_file(tmp_path / "f", 32 * MiB)
    task = FileTask(tmp_path / "f", "t1", 4 * MiB)

    async def main() -> None:
        server, port = await start(task)
        loop = asyncio.get_running_loop()
        hogs = []
        for n in range(4):  # as many as the server has upload threads
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
            hog.setblocking(False)
            await loop.sock_connect(hog, ("127.0.0.1", port))
            hello = p.encode_hello(task.task_id, f"hog-{n}", task.piece_length, task.content_length)
            await loop.sock_sendall(hog, hello + p.encode_request(n))
            hogs.append(hog)
        honest = Recorder()
        conn = await connect(port, task, honest)
        await conn.request(5)
        assert await honest.expect("piece") == ("piece", 5, task.digests[5])
        conn.close()
        for hog in hogs:
            hog.close()
        await server.close()

    run(main())


def test_one_address_cannot_take_every_piece_connection(tmp_path: Path) -> None:
    """Idle but polite connections (HELLO, then nothing) from one address used to be able to fill all
    1,024 connections, so every real child got `busy`; one address now gets at most its share."""
    make_file(tmp_path / "f", 1 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)

    async def main() -> None:
        server = PieceServer(Provider(task), "parent-peer", TokenBucket(0), max_connections_per_address=2)
        port = await server.start("127.0.0.1", 0)
        hello = p.encode_hello(task.task_id, "idle", task.piece_length, task.content_length)
        idle = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello)
            idle.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader.read(), 10)  # answered and closed
        assert b"too many connections" in refused
        writer.close()
        idle.pop().close()  # its slot comes back
        rec = Recorder()
        conn = await wait_for_room(port, task, rec)
        await conn.request(0)
        assert await rec.expect("piece") == ("piece", 0, task.digests[0])
        conn.close()
        for other in idle:
            other.close()
        await server.close()

    async def wait_for_room(port: int, task: FileTask, rec: Recorder) -> ParentConnection:
        for _ in range(200):  # the server learns of the closed connection on its next read
            try:
                return await connect(port, task, rec)
            except RemoteError:
                await asyncio.sleep(0.02)
        raise AssertionError("no room for a new connection")

    run(main())


def test_one_address_cannot_take_every_upload_slot(tmp_path: Path) -> None:
    """Children from one address that each ask for a large piece and read nothing used to hold every
    upload slot until the stall timeout (60 s): no other child got a byte. One address now holds at most
    a quarter of the slots, so a child from another address is served at once."""
    make_file(tmp_path / "f", 32 * MiB)
    task = FileTask(tmp_path / "f", "t1", 4 * MiB)

    async def main() -> None:
        server = PieceServer(Provider(task), "parent-peer", TokenBucket(0), upload_slots=8)
        assert server.slots_per_address == 2
        port = await server.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        hogs = []
        for n in range(8):  # as many as there are slots, all from 127.0.0.2
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.bind(("127.0.0.2", 0))
            hog.setblocking(False)
            await loop.sock_connect(hog, ("127.0.0.1", port))
            hello = p.encode_hello(task.task_id, f"hog-{n}", task.piece_length, task.content_length)
            await loop.sock_sendall(hog, hello + p.encode_request(n))
            hogs.append(hog)
        async with asyncio.timeout(10):  # the hogs' requests have taken their slots
            while server.active_uploads < server.slots_per_address:  # noqa: ASYNC110 - the server's counter
                await asyncio.sleep(0.01)
        honest = Recorder()
        conn = await connect(port, task, honest)  # from 127.0.0.1
        await conn.request(5)
        piece = await asyncio.wait_for(honest.expect("piece"), 10)  # was: nothing before the stall timeout
        assert piece == ("piece", 5, task.digests[5])
        assert server.active_uploads <= server.slots_per_address + 1
        conn.close()
        for hog in hogs:
            hog.close()
        await server.close()

    run(main())


class _WatchedBucket(TokenBucket):
    """A token bucket that says when a second upload has begun to wait for it."""

    def __init__(self, rate_bytes_per_s: int, burst_bytes: int) -> None:
        super().__init__(rate_bytes_per_s, burst_bytes)
        self.waits = 0
        self.second_wait = asyncio.Event()

    async def acquire(self, nbytes: int, unless: asyncio.Event | None = None) -> bool:
        self.waits += 1
        if self.waits == 2:
            self.second_wait.set()
        return await super().acquire(nbytes, unless)


@pytest.mark.parametrize("change", ["replaced", "dropped"])
def test_a_piece_changed_while_it_waits_for_tokens_is_sent_as_it_is_now(tmp_path: Path, change: str) -> None:
    """The parent reads a piece's digest when it sends the piece, not before its wait for an upload slot
    and tokens: a piece stored anew meanwhile went out with its old digest and the new bytes, and the
    child took a good parent for a corrupt one; a piece dropped meanwhile (object changed, bad bytes)
    still went out."""
    path = tmp_path / "f"
    make_file(path, 2 * MiB)
    task = FileTask(path, "t-wait", MiB)

    async def main() -> None:
        server, port = await start(task)
        server.limiter = bucket = _WatchedBucket(2 * MiB, MiB)  # piece 1 waits ~0.5 s for tokens
        rec = Recorder()
        conn = await connect(port, task, rec)
        await conn.request(0)
        await conn.request(1)
        assert (await rec.expect("piece"))[1] == 0
        await asyncio.wait_for(bucket.second_wait.wait(), 10)  # piece 1 has its slot, waits for tokens
        if change == "replaced":
            new = os.urandom(MiB)
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, new, MiB)
            os.close(fd)
            task.digests[1] = zlib.crc32(new)
            assert await rec.expect("piece") == ("piece", 1, zlib.crc32(new))
        else:
            task.available.discard(1)
            assert await rec.expect("failed") == ("failed", 1, "not_available")
        assert task.reported_corrupt == []
        conn.close()
        await server.close()

    run(main())
