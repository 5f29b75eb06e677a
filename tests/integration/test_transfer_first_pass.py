"""The source's first-pass gate over real sockets: each piece given out once, then released after its
hold, one copy at a time, and claims handed back when a child leaves (transfer_kit.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
from transfer_kit import FileTask, KiB, MiB, Recorder, connect, make_file, run, start, uploaded
from transfer_kit import close_task_fds as close_task_fds  # autouse: closes the tasks' fds

from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.transfer import protocol as p

pytestmark = pytest.mark.integration


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


@pytest.mark.parametrize("released", [True, False], ids=["after the release", "during the first pass"])
def test_a_refused_child_hears_of_the_piece_again_when_the_copy_or_claim_is_handed_back(
    tmp_path: Path, released: bool
) -> None:
    """After the release one copy of a piece goes out at a time; during the first pass a piece goes to one
    child. Either way a child refused it is told again (HAVE) when the other child's copy or claim comes
    back. Without it during the first pass: the children refused a piece wait for the release, which waits
    for that piece to be given out again, which needs one of them to ask: the swarm stalls (a host killed
    mid-download)."""
    make_file(tmp_path / "f", 768 * KiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)  # 3 pieces

    async def main() -> None:
        gate = task.gate = FirstPassGate(task.piece_count)  # released only by the test
        if released:
            gate.release()  # as after the first pass and its hold
        # rate 1 byte/s with a one-piece burst: after piece 0, a piece waits for tokens and is never sent
        server, port = await start(task, rate=1, burst=256 * KiB)
        first, second = Recorder(), Recorder()
        conn1 = await connect(port, task, first)
        conn2 = await connect(port, task, second)
        await conn1.request(0)
        assert await first.expect("piece") == ("piece", 0, task.digests[0])
        await conn1.request(1)  # its copy (its claim) waits for tokens
        await conn2.request(1)  # refused for now
        assert await second.expect("failed") == ("failed", 1, "not_available")
        conn1.close()  # handed back: the refused child hears of piece 1 again
        assert await second.expect("have") == ("have", [1])
        assert gate.released == released
        await server.close()
        del conn2

    run(main())


def test_a_child_repeating_a_refused_request_without_reading_is_dropped(tmp_path: Path) -> None:
    """Each refused REQUEST queues an ERROR answer; a child that keeps asking while it reads nothing
    made those answers pile up without limit in the parent's memory. It is now cut off."""
    make_file(tmp_path / "f", 768 * KiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)

    async def main() -> None:
        task.gate = FirstPassGate(task.piece_count, on_given_out=lambda: None)
        server, port = await start(task)
        first = Recorder()
        conn = await connect(port, task, first)
        await conn.request(0)
        assert await first.expect("piece") == ("piece", 0, task.digests[0])  # piece 0 is given out
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(p.encode_hello(task.task_id, "greedy", task.piece_length, task.content_length))
        ask = p.encode_request(0) * 10_000
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # up to a million refused requests, never reading an answer
                writer.write(ask)
                await writer.drain()
                if server.connections_open == 1:
                    break
        for _ in range(200):
            if server.connections_open == 1:
                break
            await asyncio.sleep(0.05)
        assert server.connections_open == 1  # the greedy child is gone, the first one stays
        writer.transport.abort()
        await server.close()

    run(main())


def test_after_the_release_a_queued_request_holds_no_piece_back(tmp_path: Path) -> None:
    """One copy at a time means the copy on the wire: a child that queued many requests (and reads
    slowly, or not at all) held every queued piece back from every other child until its connection
    ended (60 s for one that never reads)."""
    make_file(tmp_path / "f", 16 * MiB)
    task = FileTask(tmp_path / "f", "t1", 256 * KiB)  # 64 pieces

    async def main() -> None:
        task.gate = FirstPassGate(task.piece_count)
        task.gate.release()
        server, port = await start(task)
        hog = socket.socket()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        hog.setblocking(False)
        await asyncio.get_running_loop().sock_connect(hog, ("127.0.0.1", port))
        hello = p.encode_hello(task.task_id, "hog", task.piece_length, task.content_length)
        await asyncio.get_running_loop().sock_sendall(hog, hello + b"".join(map(p.encode_request, range(64))))
        honest = Recorder()
        conn = await connect(port, task, honest)
        await conn.request(63)  # far down the hog's queue: its buffers fill long before
        assert await honest.expect("piece") == ("piece", 63, task.digests[63])
        conn.close()
        hog.close()
        await server.close()

    run(main())
