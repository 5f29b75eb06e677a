"""A group commit's flush (fdatasync) runs while the writer goes on: piece writes are not held behind
it, and what happens to a task meanwhile (a forget, a rewrite, a deletion, a finish, a close) ends in
exactly the records that are true.

Each test holds the first fdatasync of the task's file until it says so, from whatever thread makes it.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dfly.daemon.storage import Storage, StoredTask, TaskMeta
from dfly.daemon.storage.model import MISSING

pytestmark = pytest.mark.timeout(30)

PIECE = 64 * 1024
HOLD_LIMIT_S = 10.0


class HeldFlush:
    """Holds the first fdatasync of one task file until `release`; any other goes through."""

    def __init__(self, task_id: str, real: Callable[[int], None]) -> None:
        self.task_id, self._real = task_id, real
        self.entered, self.released = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self._lock:
            hold = not self.entered.is_set() and os.readlink(f"/proc/self/fd/{fd}").endswith(self.task_id)
            if hold:
                self.entered.set()
        if hold:
            self.released.wait(HOLD_LIMIT_S)
        self._real(fd)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 5.0), "no group commit began its flush"

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldFlush]:
    flush = HeldFlush("task-flush", os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", flush)
    yield flush
    flush.release()  # never leave a thread parked


META = TaskMeta("task-flush", "https://example.com/flush.bin", 4 * PIECE, PIECE, {})


def piece(number: int, version: int = 0) -> tuple[bytes, int]:
    data = random.Random(f"{number}/{version}").randbytes(PIECE)
    return data, zlib.crc32(data)


async def write(storage: Storage, number: int, version: int = 0) -> int:
    data, digest = piece(number, version)
    await storage.write_piece(META.task_id, number, number * PIECE, data, digest)
    return digest


async def flushing(tmp_path: Path, held: HeldFlush, *pieces: int) -> Storage:
    """An open storage whose first commit of the task (with `pieces` written) is held in its flush."""
    storage = Storage(tmp_path, commit_interval_s=0.05)
    await storage.open()
    await storage.create_task(META)
    for number in pieces:
        await write(storage, number)
    await held.wait_entered()
    return storage


async def settle(storage: Storage) -> None:
    """Until nothing is pending: every record written so far is durable or gone."""
    while storage.stats()["pending_records"]:
        await asyncio.wait_for(storage.wait_for_commit(), timeout=5)


def recorded(root: Path) -> StoredTask | None:
    async def run() -> list[StoredTask]:
        storage = Storage(root)
        tasks = await storage.open()
        await storage.close()
        return tasks

    return next((t for t in asyncio.run(run()) if t.meta.task_id == META.task_id), None)


def digests(task: StoredTask | None) -> dict[int, int]:
    assert task is not None
    return {n: d for n, d in enumerate(task.digests) if d != MISSING}


def test_a_piece_write_is_not_held_behind_a_flush_in_flight(tmp_path: Path, held: HeldFlush) -> None:
    async def run() -> None:
        storage = await flushing(tmp_path, held, 0)
        # the flush is still held: this write must not wait for it (it did, 100-400 ms on a busy disk)
        await asyncio.wait_for(write(storage, 1), timeout=3)
        assert not held.released.is_set()
        assert storage.stats()["pieces_durable"] == 0
        held.release()
        await settle(storage)
        await storage.close(clean=False)

    asyncio.run(run())
    assert digests(recorded(tmp_path)) == {0: piece(0)[1], 1: piece(1)[1]}


def test_a_piece_forgotten_during_the_flush_is_not_recorded(tmp_path: Path, held: HeldFlush) -> None:
    async def run() -> None:
        storage = await flushing(tmp_path, held, 0, 1)
        storage.forget_pieces(META.task_id, [1])
        await write(storage, 2)  # after the forget: the writer has taken it
        held.release()
        await settle(storage)
        await storage.close(clean=False)

    asyncio.run(run())
    assert sorted(digests(recorded(tmp_path))) == [0, 2]


def test_a_piece_replaced_during_the_flush_keeps_only_its_new_record(tmp_path: Path, held: HeldFlush) -> None:
    async def run() -> int:
        storage = await flushing(tmp_path, held, 0)
        storage.forget_pieces(META.task_id, [0])
        new = await write(storage, 0, version=1)
        held.release()
        await settle(storage)
        await storage.close(clean=False)
        return new

    new = asyncio.run(run())
    assert digests(recorded(tmp_path)) == {0: new}


def test_a_task_deleted_during_the_flush_is_not_recorded_again(tmp_path: Path, held: HeldFlush) -> None:
    async def run() -> None:
        storage = await flushing(tmp_path, held, 0, 1)
        deleting = asyncio.ensure_future(storage.delete_task(META.task_id))
        await asyncio.wait_for(deleting, timeout=3)  # not held behind the flush either
        held.release()
        await storage.close()

    asyncio.run(run())
    assert recorded(tmp_path) is None


def test_a_finish_resolves_only_once_a_flush_covers_every_piece(tmp_path: Path, held: HeldFlush) -> None:
    async def run() -> None:
        storage = await flushing(tmp_path, held, 0)
        for number in (1, 2, 3):
            await write(storage, number)
        finishing = asyncio.ensure_future(storage.finish_task(META.task_id))
        await asyncio.sleep(0.2)  # several commit intervals: none may start while the flush is held
        assert not finishing.done()
        held.release()
        await asyncio.wait_for(finishing, timeout=5)
        assert storage.stats()["pending_records"] == 0
        await storage.close(clean=False)

    asyncio.run(run())
    task = recorded(tmp_path)
    assert task is not None
    assert task.finished
    assert sorted(digests(task)) == [0, 1, 2, 3]


def test_a_clean_close_during_the_flush_leaves_every_piece_durable(tmp_path: Path, held: HeldFlush) -> None:
    async def run() -> None:
        storage = await flushing(tmp_path, held, 0)
        await write(storage, 1)
        closing = asyncio.ensure_future(storage.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # it waits for the flush in flight
        held.release()
        await asyncio.wait_for(closing, timeout=5)

    asyncio.run(run())
    assert sorted(digests(recorded(tmp_path))) == [0, 1]
