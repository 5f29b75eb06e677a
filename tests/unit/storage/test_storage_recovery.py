"""Storage recovery: after an unclean stop only durable records count; files and records are reconciled."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import zlib
from array import array
from pathlib import Path

import pytest

from dfly.common.errors import StorageError
from dfly.daemon.storage import Storage, StoredTask, TaskMeta
from dfly.daemon.storage.model import MISSING

PIECE = 64 * 1024


def piece_bytes(task_id: str, number: int, size: int) -> bytes:
    return random.Random(f"{task_id}/{number}").randbytes(size)


def make_meta(task_id: str, pieces: int = 4) -> TaskMeta:
    return TaskMeta(task_id, f"https://example.com/{task_id}", pieces * PIECE, PIECE, {})


async def write(storage: Storage, meta: TaskMeta, numbers: list[int]) -> None:
    for n in numbers:
        offset, length = meta.piece_span(n)
        data = piece_bytes(meta.task_id, n, length)
        await storage.write_piece(meta.task_id, n, offset, data, zlib.crc32(data))


async def reopen(root: Path) -> tuple[Storage, dict[str, StoredTask]]:
    storage = Storage(root)
    tasks = await storage.open()
    return storage, {t.meta.task_id: t for t in tasks}


def test_unclean_stop_keeps_only_committed_pieces(tmp_path: Path) -> None:
    done, partial = make_meta("task-done"), make_meta("task-partial")

    async def run() -> None:
        # A long interval: the only commits are the ones finish_task forces.
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        await storage.create_task(done)
        await storage.create_task(partial)
        await write(storage, partial, [0, 1])
        await write(storage, done, [0, 1, 2, 3])
        await storage.finish_task(done.task_id)  # commits everything dirty, partial's 0 and 1 too
        await write(storage, partial, [2, 3])  # available, never durable
        assert storage.stats()["pending_records"] == 2
        await storage.close(clean=False)
        assert not (tmp_path / "clean-shutdown").exists()

        again, tasks = await reopen(tmp_path)
        assert not again.was_clean
        assert tasks[done.task_id].finished
        assert sorted(tasks[done.task_id].pieces) == [0, 1, 2, 3]
        assert not tasks[partial.task_id].finished
        assert sorted(tasks[partial.task_id].pieces) == [0, 1]
        for n, digest in tasks[partial.task_id].pieces.items():
            assert digest == zlib.crc32(piece_bytes(partial.task_id, n, PIECE))
        # The unfinished task resumes: the missing pieces can be written and the task finished.
        await write(again, partial, [2, 3])
        await again.finish_task(partial.task_id)
        await again.close()

    asyncio.run(run())


def test_uncommitted_new_task_disappears_after_unclean_stop(tmp_path: Path) -> None:
    meta = make_meta("task-new")

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        await storage.create_task(meta)
        await write(storage, meta, [0])
        await storage.close(clean=False)
        again, tasks = await reopen(tmp_path)
        assert tasks == {}
        assert again.recovery is not None
        assert again.recovery.removed_files == 1
        assert not again.task_path(meta.task_id).exists()
        await again.close()

    asyncio.run(run())


def test_file_without_record_and_record_without_file_are_cleaned(tmp_path: Path) -> None:
    keep, missing, truncated = make_meta("task-keep"), make_meta("task-missing"), make_meta("task-short")

    async def populate() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        for meta in (keep, missing, truncated):
            await storage.create_task(meta)
            await write(storage, meta, [0, 1, 2, 3])
            await storage.finish_task(meta.task_id)
        await storage.close()

    asyncio.run(populate())
    tasks_dir = tmp_path / "tasks"
    (tasks_dir / "tas" / "task-missing").unlink()
    with open(tasks_dir / "tas" / "task-short", "r+b") as f:
        f.truncate(PIECE)
    (tasks_dir / "str").mkdir()
    (tasks_dir / "str" / "stray-file").write_bytes(b"no record")
    (tasks_dir / "tas" / "task-stray").write_bytes(b"no record either")
    (tasks_dir / "junk").write_bytes(b"not a prefix dir")
    with sqlite3.connect(tmp_path / "metadata.db") as db:
        db.execute("INSERT INTO pieces (task_id, number, digest) VALUES ('ghost-task', 0, 1)")
        db.execute("INSERT INTO pieces (task_id, number, digest) VALUES ('task-keep', 99, 1)")

    async def check() -> None:
        storage, tasks = await reopen(tmp_path)
        assert storage.was_clean
        assert list(tasks) == [keep.task_id]
        assert sorted(tasks[keep.task_id].pieces) == [0, 1, 2, 3]
        report = storage.recovery
        assert report is not None
        assert report.dropped_records == 2
        assert report.dropped_pieces == 4 + 4 + 1 + 1
        assert report.removed_files == 4  # task-short's file, two strays, the junk entry
        await storage.close()

    asyncio.run(check())
    assert sorted(p.relative_to(tasks_dir).as_posix() for p in tasks_dir.rglob("*")) == [
        "tas",
        "tas/task-keep",
    ]
    with sqlite3.connect(tmp_path / "metadata.db") as db:
        assert db.execute("SELECT DISTINCT task_id FROM pieces").fetchall() == [("task-keep",)]
        assert db.execute("SELECT COUNT(*) FROM pieces").fetchone() == (4,)
        assert db.execute("SELECT task_id FROM tasks").fetchall() == [("task-keep",)]


def test_marker_is_removed_at_open_and_written_at_clean_close(tmp_path: Path) -> None:
    async def run() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        assert not (tmp_path / "clean-shutdown").exists()
        await storage.close()
        assert (tmp_path / "clean-shutdown").exists()
        again = Storage(tmp_path)
        await again.open()
        assert again.was_clean
        assert not (tmp_path / "clean-shutdown").exists()
        await again.close(clean=False)
        third = Storage(tmp_path)
        await third.open()
        assert not third.was_clean
        await third.close()

    asyncio.run(run())


def test_recovered_tasks_carry_their_digests_by_number_and_their_files_mtime(tmp_path: Path) -> None:
    """Start-up reads each task's pieces grouped in one row and its file's mtime from the one stat that
    checks its size (the daemon's last use of a task survives a restart as that mtime)."""
    meta = make_meta("task-partial")

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        await storage.create_task(meta)
        await write(storage, meta, [3, 1])
        await storage.close()
        os.utime(storage.task_path(meta.task_id), (1_000_000.0, 1_000_000.0))
        again, tasks = await reopen(tmp_path)
        task = tasks[meta.task_id]
        digests = [zlib.crc32(piece_bytes(meta.task_id, n, PIECE)) for n in (1, 3)]
        assert task.digests == array("q", [MISSING, digests[0], MISSING, digests[1]])
        assert task.held == 2
        assert task.mtime == 1_000_000.0
        assert not task.finished
        await again.close()

    asyncio.run(run())


def stored_with_two_pieces(root: Path, metas: list[TaskMeta]) -> None:
    """A storage dir holding these tasks, pieces 0 and 1 of each written, closed cleanly."""

    async def populate() -> None:
        storage = Storage(root, commit_interval_s=3600)
        await storage.open()
        for meta in metas:
            await storage.create_task(meta)
            await write(storage, meta, [0, 1])
        await storage.close()

    asyncio.run(populate())


def test_damaged_task_records_are_dropped_not_fatal(tmp_path: Path) -> None:
    """SQLite checks no types and has no checksums: a task record with a value no task can have (a flipped
    bit, a hand edit) made the writer thread die while it opened the storage, and the daemon hung at its
    start for ever (the open's future was never resolved). Such a record is dropped with its file."""
    keep = make_meta("task-keep")
    damaged = {
        "task-zero": "piece_length = 0",  # ZeroDivisionError in piece_count
        "task-text": "content_length = 'abc'",  # TypeError
        "task-many": f"content_length = {1 << 41}",  # 2^25 pieces: more than a layout may have
        "task-odd": "piece_length = 1000",  # not a layout dfly makes
    }

    stored_with_two_pieces(tmp_path, [keep, *(make_meta(task_id) for task_id in damaged)])
    with sqlite3.connect(tmp_path / "metadata.db") as db:
        for task_id, change in damaged.items():
            db.execute(f"UPDATE tasks SET {change} WHERE task_id = ?", (task_id,))

    async def check() -> None:
        storage = Storage(tmp_path)
        async with asyncio.timeout(30):
            tasks = {t.meta.task_id: t for t in await storage.open()}
        assert list(tasks) == [keep.task_id]
        assert storage.recovery is not None
        assert storage.recovery.dropped_records == len(damaged)
        await storage.close()

    asyncio.run(check())
    assert sorted(p.name for p in (tmp_path / "tasks" / "tas").iterdir()) == ["task-keep"]
    with sqlite3.connect(tmp_path / "metadata.db") as db:
        assert db.execute("SELECT DISTINCT task_id FROM pieces").fetchall() == [("task-keep",)]


def test_damaged_piece_records_and_blob_ids_are_dropped_not_fatal(tmp_path: Path) -> None:
    """A piece record that is not an int64 failed the whole open (every start exited 1; the only way out
    was deleting metadata.db and the whole cache with it), and a task record whose id had become a BLOB
    was never deleted (the DELETE named its text). Each such task goes, with its records and file."""
    keep = make_meta("task-keep")
    damaged = {
        "task-digest-text": "UPDATE pieces SET digest = 'x' WHERE task_id = ? AND number = 1",
        "task-digest-real": "UPDATE pieces SET digest = 1e20 WHERE task_id = ? AND number = 0",
        "task-number-real": "UPDATE pieces SET number = 1.5 WHERE task_id = ? AND number = 1",
        "task-blob-id": "UPDATE tasks SET task_id = CAST(task_id AS BLOB) WHERE task_id = ?",
        # bytes that are not UTF-8: reading them as text failed the whole load
        "task-digest-bytes": "UPDATE pieces SET digest = X'FF00FE' WHERE task_id = ? AND number = 1",
        "task-number-bytes": "UPDATE pieces SET number = X'FFFE' WHERE task_id = ? AND number = 1",
        "task-id-bytes": "UPDATE tasks SET task_id = CAST(X'FF' || task_id AS TEXT) WHERE task_id = ?",
        "task-url-bytes": "UPDATE tasks SET url = CAST(X'FFFE' AS TEXT) WHERE task_id = ?",
    }

    stored_with_two_pieces(tmp_path, [keep, *(make_meta(task_id) for task_id in damaged)])
    with sqlite3.connect(tmp_path / "metadata.db") as db:
        for task_id, change in damaged.items():
            db.execute(change, (task_id,))

    async def check() -> None:
        storage = Storage(tmp_path)
        async with asyncio.timeout(30):
            tasks = {t.meta.task_id: t for t in await storage.open()}
        assert list(tasks) == [keep.task_id]
        assert tasks[keep.task_id].held == 2
        await storage.close()

    asyncio.run(check())
    assert sorted(p.name for p in (tmp_path / "tasks" / "tas").iterdir()) == ["task-keep"]
    with sqlite3.connect(tmp_path / "metadata.db") as db:
        db.text_factory = bytes
        assert db.execute("SELECT task_id FROM tasks").fetchall() == [(b"task-keep",)]
        assert db.execute("SELECT DISTINCT task_id FROM pieces").fetchall() == [(b"task-keep",)]


def test_an_unexpected_failure_while_opening_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception the writer thread meets, not only storage and OS errors, fails the operation it was
    running: the open's caller got no answer and waited for ever."""

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug in recovery")

    monkeypatch.setattr("dfly.daemon.storage.writer.recover", broken)

    async def check() -> None:
        storage = Storage(tmp_path)
        async with asyncio.timeout(30):
            with pytest.raises(StorageError, match="a bug in recovery"):
                await storage.open()

    asyncio.run(check())
