"""Storage writer thread: group-commit timing, thread ownership of I/O, errors, cancellation."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dfly.daemon.storage.files as files
import dfly.daemon.storage.writer as writer_module
from dfly.common.errors import StorageError
from dfly.daemon.storage import Storage, TaskMeta
from dfly.daemon.storage.model import PieceSet

PIECE = 64 * 1024


def make_meta(task_id: str = "task-writer", pieces: int = 4) -> TaskMeta:
    return TaskMeta(task_id, f"https://example.com/{task_id}", pieces * PIECE, PIECE, {})


def piece(n: int) -> tuple[bytes, int]:
    data = bytes([n % 256]) * PIECE
    return data, zlib.crc32(data)


def test_write_resolves_before_durable_and_commit_follows_within_interval(tmp_path: Path) -> None:
    interval = 0.5
    meta = make_meta()

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=interval)
        await storage.open()
        await storage.create_task(meta)
        await storage.wait_for_commit(1)  # the task record itself
        data, digest = piece(0)
        await storage.write_piece(meta.task_id, 0, 0, data, digest)
        stats = storage.stats()
        assert stats["pieces_written"] == 1
        assert stats["pieces_durable"] == 0  # available, not yet durable
        assert stats["pending_records"] == 1
        # the timer commits it (bounded so: a commit left to close() would time out here)
        await asyncio.wait_for(storage.wait_for_commit(2), timeout=interval + 2.0)
        assert storage.stats()["pieces_durable"] == 1
        assert storage.stats()["pending_records"] == 0
        await storage.close()

    asyncio.run(run())


def test_finish_commits_at_once(tmp_path: Path) -> None:
    meta = make_meta()

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        await storage.create_task(meta)
        for n in range(meta.piece_count):
            data, digest = piece(n)
            await storage.write_piece(meta.task_id, n, n * PIECE, data, digest)
        assert storage.stats()["commits"] == 0
        await asyncio.wait_for(storage.finish_task(meta.task_id), timeout=5)
        stats = storage.stats()
        assert stats["commits"] == 1
        assert stats["pieces_durable"] == meta.piece_count
        await storage.close()

    asyncio.run(run())


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.calls.append((name, threading.get_ident()))
            return fn(*args, **kwargs)

        return wrapper


def test_event_loop_never_touches_sqlite_fsync_or_pwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    for name in ("pwrite", "fdatasync", "fsync", "posix_fallocate"):
        monkeypatch.setattr(os, name, recorder.wrap(name, getattr(os, name)))

    class TrackingConnection(sqlite3.Connection):
        def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
            recorder.wrap("sqlite.execute", lambda: None)()
            return super().execute(*args, **kwargs)

        def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
            recorder.wrap("sqlite.executemany", lambda: None)()
            return super().executemany(*args, **kwargs)

    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        recorder.wrap("sqlite.connect", lambda: None)()
        return real_connect(*args, factory=TrackingConnection, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    meta = make_meta()

    async def run() -> tuple[int, int | None, int | None]:
        loop_thread = threading.get_ident()
        storage = Storage(tmp_path, commit_interval_s=0.05)
        await storage.open()
        await storage.create_task(meta)
        for n in range(meta.piece_count):
            data, digest = piece(n)
            await storage.write_piece(meta.task_id, n, n * PIECE, data, digest)
        await storage.wait_for_commit()
        await storage.finish_task(meta.task_id)
        storage.read_fd(meta.task_id)
        writer, syncer = storage.writer_thread_id, storage.sync_thread_id
        await storage.delete_task(meta.task_id)
        await storage.close()
        return loop_thread, writer, syncer

    loop_thread, writer, syncer = asyncio.run(run())
    names = {name for name, _ in recorder.calls}
    assert {"pwrite", "fdatasync", "fsync", "posix_fallocate", "sqlite.connect", "sqlite.execute"} <= names
    assert "sqlite.executemany" in names
    assert writer is not None
    assert syncer is not None
    assert loop_thread not in {writer, syncer}
    flushes = {"fdatasync", "fsync"}
    assert {ident for name, ident in recorder.calls if name not in flushes} == {writer}
    # the group commits' flushes run in the syncer's thread (the final one at close in the writer's)
    assert {ident for name, ident in recorder.calls if name in flushes} <= {writer, syncer}
    assert syncer in {ident for name, ident in recorder.calls if name == "fdatasync"}


def test_unwritable_dir_raises_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")

    async def run() -> None:
        storage = Storage(blocker / "storage")
        with pytest.raises(StorageError, match="cannot open storage dir") as info:
            await storage.open()
        assert "\n" not in str(info.value)

    asyncio.run(run())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir_raises_storage_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)

    async def run() -> None:
        with pytest.raises(StorageError):
            await Storage(tmp_path / "storage").open()

    try:
        asyncio.run(run())
    finally:
        tmp_path.chmod(0o700)


def test_write_failure_fails_only_that_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = make_meta()
    real_pwrite = os.pwrite
    failures = [errno.ENOSPC]

    def flaky_pwrite(fd: int, data: Any, offset: int) -> int:
        if failures:
            raise OSError(failures.pop(), os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        await storage.create_task(meta)
        monkeypatch.setattr(os, "pwrite", flaky_pwrite)
        data, digest = piece(0)
        with pytest.raises(StorageError, match="No space left on device") as info:
            await storage.write_piece(meta.task_id, 0, 0, data, digest)
        assert "\n" not in str(info.value)
        await storage.write_piece(meta.task_id, 0, 0, data, digest)  # the thread goes on
        assert storage.stats()["write_errors"] == 1
        assert storage.stats()["pieces_written"] == 1
        await storage.close()

    asyncio.run(run())


def test_preallocation_failure_raises_storage_error(tmp_path: Path) -> None:
    huge = TaskMeta("task-huge", "u", 1 << 62, 1 << 26, {})

    async def run() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        with pytest.raises(StorageError, match="cannot preallocate"):
            await storage.create_task(huge)
        assert not storage.task_path(huge.task_id).exists()
        await storage.close()

    asyncio.run(run())


def test_cancelled_write_never_outlives_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write cancelled while queued is skipped; one cancelled mid-pwrite holds the caller until done."""
    meta = make_meta()
    entered = threading.Event()
    release = threading.Event()

    def blocking_pwrite_all(fd: int, view: memoryview, offset: int) -> None:
        if offset == 0:
            entered.set()
            release.wait(timeout=10)
        files.pwrite_all(fd, view, offset)

    monkeypatch.setattr(writer_module, "pwrite_all", blocking_pwrite_all)

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        await storage.create_task(meta)
        first = asyncio.create_task(storage.write_piece(meta.task_id, 0, 0, *piece(0)))
        await asyncio.to_thread(entered.wait, 10)  # the writer is inside piece 0's pwrite
        second = asyncio.create_task(storage.write_piece(meta.task_id, 1, PIECE, *piece(1)))
        await asyncio.sleep(0)  # let `second` enqueue (a scheduling step, not a timed wait)
        second.cancel()
        first.cancel()
        for _ in range(10):  # plenty of loop iterations to deliver both cancellations
            await asyncio.sleep(0)
        assert second.cancelled()
        assert not first.done()  # held: the writer is still reading its buffer
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        stats = storage.stats()
        assert stats["pieces_written"] == 1  # piece 1 was skipped, piece 0 completed
        await storage.close()

    asyncio.run(run())


def test_commit_failing_with_enospc_records_nothing_and_other_tasks_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fdatasync of one task's file fails (disk full): its finish fails with a clear error, none of its
    pieces is recorded (after a reopen they are simply missing), `on_pieces_lost` names them, and
    another task commits normally."""
    full, fine = make_meta("task-full"), make_meta("task-fine")
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(full.task_id):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fdatasync(fd)

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        lost: list[tuple[str, list[int]]] = []
        storage.on_pieces_lost = lambda task_id, pieces: lost.append((task_id, pieces))
        await storage.open()
        for meta in (full, fine):
            await storage.create_task(meta)
            for n in range(meta.piece_count):
                data, digest = piece(n)
                await storage.write_piece(meta.task_id, n, n * PIECE, data, digest)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        with pytest.raises(StorageError, match="No space left on device"):
            await asyncio.wait_for(storage.finish_task(full.task_id), timeout=5)
        await asyncio.wait_for(storage.finish_task(fine.task_id), timeout=5)
        assert storage.stats()["commit_errors"] >= 1
        # the loop is told which written pieces are gone, so they are neither served nor used
        assert lost == [(full.task_id, list(range(full.piece_count)))]
        await storage.close()

        reopened = Storage(tmp_path, commit_interval_s=3600)
        stored = {task.meta.task_id: task for task in await reopened.open()}
        assert stored["task-fine"].pieces == {n: piece(n)[1] for n in range(fine.piece_count)}
        assert stored.get("task-full") is None or stored["task-full"].pieces == {}
        await reopened.close()

    asyncio.run(run())


def test_a_piece_set_counts_each_piece_once() -> None:
    recorded = PieceSet(8, [0, 3, 3])
    assert len(recorded) == 2
    recorded.add(3)
    recorded.add(7)
    assert len(recorded) == 3
    assert 7 in recorded
    assert 8 not in recorded
    recorded.difference_update([3, 5])
    assert len(recorded) == 2
    assert 3 not in recorded
