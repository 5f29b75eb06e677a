"""Storage: pieces, metadata and finish survive close + reopen; task lifecycle and argument checks."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import zlib
from pathlib import Path

import pytest

from dfly.common.errors import StorageError
from dfly.daemon.storage import Storage, TaskMeta
from dfly.daemon.storage.db import MetadataDB

PIECE = 64 * 1024


def piece_bytes(task_id: str, number: int, size: int) -> bytes:
    return random.Random(f"{task_id}/{number}").randbytes(size)


def make_meta(task_id: str = "task-roundtrip", content_length: int = 5 * PIECE + 123) -> TaskMeta:
    return TaskMeta(task_id, f"https://example.com/{task_id}", content_length, PIECE, {"ETag": '"e1"'})


async def write_all(storage: Storage, meta: TaskMeta, numbers: range | list[int] | None = None) -> None:
    for n in numbers if numbers is not None else range(meta.piece_count):
        offset, length = meta.piece_span(n)
        data = piece_bytes(meta.task_id, n, length)
        await storage.write_piece(meta.task_id, n, offset, data, zlib.crc32(data))


def test_write_finish_close_reopen_returns_pieces_meta_and_bytes(tmp_path: Path) -> None:
    meta = make_meta()

    async def first() -> None:
        storage = Storage(tmp_path, commit_interval_s=30)
        assert await storage.open() == []
        await storage.create_task(meta)
        await write_all(storage, meta)
        await storage.finish_task(meta.task_id)
        assert storage.stats()["pending_records"] == 0
        await storage.close()

    async def second() -> None:
        storage = Storage(tmp_path)
        tasks = await storage.open()
        assert storage.was_clean
        assert len(tasks) == 1
        (task,) = tasks
        assert task.meta == meta
        assert task.finished
        assert sorted(task.pieces) == list(range(meta.piece_count))
        fd = storage.read_fd(meta.task_id)
        assert storage.read_fd(meta.task_id) == fd  # cached
        for n, digest in task.pieces.items():
            offset, length = meta.piece_span(n)
            on_disk = os.pread(fd, length, offset)
            assert on_disk == piece_bytes(meta.task_id, n, length)
            assert zlib.crc32(on_disk) == digest
        assert storage.stats()["tasks"] == 1
        assert storage.stats()["bytes"] == meta.content_length
        await storage.close()

    asyncio.run(first())
    assert (tmp_path / "clean-shutdown").exists()
    assert storage_file(tmp_path, meta.task_id).stat().st_size == meta.content_length
    asyncio.run(second())


def storage_file(root: Path, task_id: str) -> Path:
    return root / "tasks" / task_id[:3] / task_id


def test_create_is_idempotent_and_preallocates(tmp_path: Path) -> None:
    meta = make_meta()

    async def run() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        await storage.create_task(meta)
        await storage.create_task(meta)
        assert storage.task_path(meta.task_id) == storage_file(tmp_path, meta.task_id)
        assert storage.task_path(meta.task_id).stat().st_size == meta.content_length
        other = TaskMeta(meta.task_id, meta.url, meta.content_length + 1, PIECE, {})
        with pytest.raises(StorageError, match="already exists"):
            await storage.create_task(other)
        with pytest.raises(StorageError, match="invalid task id"):
            await storage.create_task(TaskMeta("../etc", "u", 1, PIECE, {}))
        await storage.close()

    asyncio.run(run())


def test_empty_task_can_finish(tmp_path: Path) -> None:
    meta = make_meta("empty-task", 0)

    async def run() -> list[bool]:
        storage = Storage(tmp_path, commit_interval_s=30)
        await storage.open()
        await storage.create_task(meta)
        await storage.finish_task(meta.task_id)
        await storage.close()
        again = Storage(tmp_path)
        tasks = await again.open()
        await again.close()
        return [t.finished for t in tasks]

    assert asyncio.run(run()) == [True]


def test_bad_arguments_raise_storage_error(tmp_path: Path) -> None:
    meta = make_meta()

    async def run() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        with pytest.raises(StorageError, match="unknown task"):
            await storage.write_piece("nope-task", 0, 0, b"x", 0)
        with pytest.raises(StorageError, match="unknown task"):
            storage.read_fd("nope-task")
        await storage.create_task(meta)
        with pytest.raises(StorageError, match="expected"):
            await storage.write_piece(meta.task_id, 0, 0, b"short", 0)
        with pytest.raises(StorageError, match="expected"):
            await storage.write_piece(meta.task_id, 1, 0, bytes(PIECE), 0)
        with pytest.raises(StorageError, match="out of range"):
            await storage.write_piece(meta.task_id, 99, 99 * PIECE, bytes(PIECE), 0)
        await write_all(storage, meta, [0, 1])
        with pytest.raises(StorageError, match="2 of 6 pieces"):
            await storage.finish_task(meta.task_id)
        await storage.close()
        with pytest.raises(StorageError, match="closed"):
            await storage.create_task(meta)

    asyncio.run(run())


def test_delete_removes_file_records_and_read_fd(tmp_path: Path) -> None:
    meta = make_meta()
    keep = make_meta("task-keep", PIECE)

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=30)
        await storage.open()
        for m in (meta, keep):
            await storage.create_task(m)
            await write_all(storage, m)
            await storage.finish_task(m.task_id)
        fd = storage.read_fd(meta.task_id)
        await storage.delete_task(meta.task_id)
        await storage.delete_task(meta.task_id)  # idempotent
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
        assert not storage.task_path(meta.task_id).exists()
        assert storage.stats()["tasks"] == 1
        await storage.close()
        again = Storage(tmp_path)
        tasks = await again.open()
        assert [t.meta.task_id for t in tasks] == [keep.task_id]
        assert again.recovery is not None
        assert again.recovery.removed_files == 0
        assert again.recovery.tasks == []  # the tasks (every piece digest) went to the caller, not kept
        assert again.stored_bytes() == sum(t.meta.content_length for t in tasks)  # a running total
        await again.close()

    asyncio.run(run())


def test_a_deletion_whose_records_stay_never_lends_them_to_a_new_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full or locked db fails the deletion's transaction: the file still goes, and a task created
    again under the id does not inherit the old records (they claimed pieces over zeroed bytes, and a
    dfget got a file of zeros with exit 0). A file left behind is replaced, never truncated, so an
    output hard-linked to it keeps its bytes."""
    meta = make_meta("task-stale")

    def db_full(conn: object, task_ids: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async def run() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        await storage.create_task(meta)
        await write_all(storage, meta)
        await storage.finish_task(meta.task_id)
        linked = tmp_path / "user-output"
        os.link(storage.task_path(meta.task_id), linked)
        with monkeypatch.context() as patched:
            patched.setattr(MetadataDB, "delete_tasks", staticmethod(db_full))
            with pytest.raises(StorageError, match="disk is full"):
                await storage.delete_task(meta.task_id)
        assert not storage.task_path(meta.task_id).exists()
        storage.task_path(meta.task_id).parent.mkdir(exist_ok=True)
        os.link(linked, storage.task_path(meta.task_id))  # as if the unlink had failed too
        await storage.create_task(meta)
        await write_all(storage, meta, [0])
        assert linked.read_bytes()[:PIECE] == piece_bytes(meta.task_id, 0, PIECE)
        assert os.stat(linked).st_size == meta.content_length
        await storage.close()
        again = Storage(tmp_path)
        (task,) = await again.open()
        assert sorted(task.pieces) == [0]
        assert not task.finished
        await again.close()

    asyncio.run(run())


def test_writer_keeps_no_reference_to_the_buffer(tmp_path: Path) -> None:
    meta = make_meta("task-buffer", PIECE)

    async def run() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        await storage.create_task(meta)
        buf = bytearray(piece_bytes(meta.task_id, 0, PIECE))
        with memoryview(buf) as view:  # exiting releases: fails if another export of buf remains
            await storage.write_piece(meta.task_id, 0, 0, view, zlib.crc32(buf))
        buf.extend(b"resizable again")  # raises BufferError while any view of buf is alive
        await storage.close()

    asyncio.run(run())


@pytest.mark.parametrize("yields", [0, 1, 3])
def test_an_open_cancelled_midway_stops_its_writer_and_frees_the_dir(tmp_path: Path, yields: int) -> None:
    """A daemon stopped (SIGINT) while its storage opened: the cancelled open used to wait for its writer
    thread, which waited on its queue for ever, so the process hung holding the dir's lock."""

    async def run() -> None:
        storage = Storage(tmp_path)
        opening = asyncio.create_task(storage.open())
        for _ in range(yields):
            await asyncio.sleep(0)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(opening, timeout=10)
        again = Storage(tmp_path)
        await again.open()  # the lock is free
        await again.close()

    asyncio.run(run())


def test_second_storage_on_same_dir_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        first = Storage(tmp_path)
        await first.open()
        second = Storage(tmp_path)
        with pytest.raises(StorageError, match="in use by another process"):
            await second.open()
        await first.close()

    asyncio.run(run())
