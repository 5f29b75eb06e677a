"""What the piece-transfer tests share: a ServedTask over a real file, a recording ParentListener, and
helpers to start a PieceServer on 127.0.0.1:0 and connect a ParentConnection child to it.

`FileTask` opens its file and leaves the fd in OPEN_FDS; the autouse fixture `close_task_fds`, which
each test module imports, closes them after each test."""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.client import ParentConnection, connect_parent
from dfly.daemon.transfer.ratelimit import TokenBucket
from dfly.daemon.transfer.server import PieceServer, ServedTask

KiB = 1024
MiB = 1024 * KiB
OPEN_FDS: list[int] = []


@pytest.fixture(autouse=True)
def close_task_fds() -> Iterator[None]:
    yield
    while OPEN_FDS:
        os.close(OPEN_FDS.pop())


class FileTask:
    """A tiny ServedTask over a real file; pieces become available when the test says so."""

    def __init__(self, path: Path, task_id: str, piece_length: int, available: Iterable[int] | None = None):
        self.task_id = task_id
        self.piece_length = piece_length
        self.content_length = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)
        OPEN_FDS.append(self.fd)
        self.digests: dict[int, int] = {}
        with path.open("rb") as f:
            for n in range(self.piece_count):
                self.digests[n] = zlib.crc32(f.read(piece_length))
        self.available = set(range(self.piece_count) if available is None else available)
        self.subscribers: list[Callable[[int], None]] = []
        self.gate: FirstPassGate | None = None
        self.child_holds: dict[str, set[int]] = {}  # what peer_has reports (the child is also our parent)
        self.holders = 0  # child connections holding the task (ServedTask.hold)
        self.reported_corrupt: list[int] = []  # ServedTask.report_corrupt calls

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

    def hold(self) -> Callable[[], None]:
        self.holders += 1

        def release() -> None:
            self.holders -= 1

        return release

    def report_corrupt(self, number: int) -> None:
        self.reported_corrupt.append(number)

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


async def uploaded(server: CountingPieceServer, task_id: str, nbytes: int, timeout_s: float = 10.0) -> None:
    """Wait until the server has counted `nbytes` uploaded for the task (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while server.bytes_uploaded_by_task.get(task_id, 0) < nbytes:
        assert asyncio.get_running_loop().time() < deadline, server.bytes_uploaded_by_task
        await asyncio.sleep(0.01)


async def released(task: FileTask, timeout_s: float = 10.0) -> None:
    """Wait until no child connection holds the task (the server ended them all; bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while task.holders:
        assert asyncio.get_running_loop().time() < deadline, f"{task.holders} connections still hold it"
        await asyncio.sleep(0.01)


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout_s))


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


class CountingPieceServer(PieceServer):
    """The piece server with its uploads counted per task, for the tests to wait on."""

    def __init__(self, provider: Provider, peer_id: str, limiter: TokenBucket) -> None:
        super().__init__(provider, peer_id, limiter, on_uploaded=self._count)
        self.bytes_uploaded_by_task: dict[str, int] = {}

    def _count(self, task_id: str, nbytes: int) -> None:
        self.bytes_uploaded_by_task[task_id] = self.bytes_uploaded_by_task.get(task_id, 0) + nbytes


async def start(task: FileTask, rate: int = 0, burst: int | None = None) -> tuple[CountingPieceServer, int]:
    server = CountingPieceServer(Provider(task), "parent-peer", TokenBucket(rate, burst))
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
