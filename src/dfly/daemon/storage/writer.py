"""The storage writer thread: the one thread that pwrites, owns task state and talks to SQLite (DESIGN.md §5).

Rules:
- The event loop only enqueues operations (`submit`) and gets results through futures resolved with
  `loop.call_soon_threadsafe`; it never waits on this thread's locks for longer than a state flip.
- A piece write resolves as soon as its bytes are pwritten (the piece is *available*); its record joins
  the pending set and becomes *durable* at a group commit, which this thread runs through its
  `GroupCommit` (group_commit.py: when commits run, the flush in the syncer's thread, failed flushes).
- Operations are taken from the queue one at a time, in order: a forget drops the pending records of
  every write queued before it at once (its durable ones go at a commit run at once), and writes that
  queue up during a commit batch into the next one. A flushed commit comes back on the same queue.
- The thread keeps no reference to a write's buffer once its future is resolved. A write whose caller
  was cancelled before the thread took it is skipped (see `WriteOp.claim`).
- Errors become `StorageError` on the future of the operation that failed; the thread goes on. An
  unexpected exception fails every queued operation and marks the writer dead, never silently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dfly.common.errors import StorageError
from dfly.daemon.storage.db import MetadataDB
from dfly.daemon.storage.files import (
    TaskFds,
    create_task_file,
    open_root,
    pwrite_all,
    release_root,
    remove_task_file,
    take_marker,
    write_marker_reporting,
)
from dfly.daemon.storage.group_commit import GroupCommit
from dfly.daemon.storage.model import DB_NAME, Counters, PieceSet, TaskMeta, WriterTask, short
from dfly.daemon.storage.ops import (
    CreateOp,
    DeleteOp,
    FinishOp,
    ForgetOp,
    HeadersOp,
    LoopCalls,
    Op,
    OpenOp,
    StopOp,
    WriteOp,
)
from dfly.daemon.storage.recovery import RecoveryReport, recover
from dfly.daemon.storage.syncer import SyncJob

log = logging.getLogger(__name__)

MAX_OPEN_FILES = 256  # write fds kept open; a task with pending records always keeps its fd


class WriterThread:
    def __init__(
        self,
        root: Path,
        commit_interval_s: float,
        loop: asyncio.AbstractEventLoop,
        on_commit: Callable[[int], None],
        on_lost: Callable[[str, list[int]], None] | None = None,
    ) -> None:
        self.root = root
        self.counters = Counters()
        self._to_loop = LoopCalls(loop)
        self._queue: queue.SimpleQueue[Op | SyncJob] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="dfly-storage-writer", daemon=True)
        self._closed: StorageError | None = None  # set once the thread stops taking operations
        self._submit_lock = threading.Lock()
        self._db: MetadataDB | None = None
        self._lock_fd = -1
        self._tasks: dict[str, WriterTask] = {}  # shared with the group commit: changed in place only
        self._fds = TaskFds(root, MAX_OPEN_FILES, self._has_pending)
        self._group_commit = GroupCommit(
            self._tasks,
            self._fds,
            lambda: self._db,
            self.counters,
            self._to_loop,
            commit_interval_s,
            self._queue.put,
            on_commit,
            on_lost,
        )

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    @property
    def sync_ident(self) -> int | None:
        return self._group_commit.sync_ident

    def start(self, open_op: OpenOp) -> None:
        self._queue.put(open_op)
        self._group_commit.start_syncer()
        self._thread.start()

    def submit(self, op: Op) -> None:
        with self._submit_lock:  # against a race with the final drain in _fail_queued
            if self._closed is not None:
                raise self._closed
            self._queue.put(op)

    def join(self) -> None:
        self._thread.join()

    # -- the thread --------------------------------------------------------------------------------

    def _main(self) -> None:
        op: Op | SyncJob | None = None
        try:
            while True:
                op = None
                deadline = self._group_commit.deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    op = self._queue.get(timeout=timeout)
                except queue.Empty:
                    op = None
                if isinstance(op, SyncJob):
                    self._group_commit.complete(op)
                elif op is not None and self._handle(op):
                    break
                self._group_commit.start_if_due(deadline)
        except BaseException as exc:
            log.exception("storage writer thread failed")
            self._closed = StorageError(f"storage writer thread failed: {exc!r}")
            if op is not None and not isinstance(op, SyncJob):  # the one it was running: its caller waits
                self._to_loop.resolve(op.future, exc=self._closed)
            for task in self._tasks.values():
                self._to_loop.resolve_all(task.finish_waiters, self._closed)
            self._group_commit.abandon(self._closed)
            self._release(clean=False)
        self._fail_queued()

    def _fail_queued(self) -> None:
        with self._submit_lock:
            closed = self._closed = self._closed or StorageError("storage is closed")
            while True:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    return
                if isinstance(op, SyncJob):
                    continue  # its waiters were failed with the writer's tasks
                if isinstance(op, WriteOp):
                    if not op.claim():
                        continue
                    op.data = None
                self._to_loop.resolve(op.future, exc=closed)

    def _handle(self, op: Op) -> bool:
        """Run one operation; True when the thread must stop."""
        if isinstance(op, WriteOp):
            self._write(op)
            return False
        try:
            if isinstance(op, OpenOp):
                self._to_loop.resolve(op.future, self._open())
            elif isinstance(op, CreateOp):
                self._create(op.meta)
                self._to_loop.resolve(op.future)
            elif isinstance(op, FinishOp):
                self._finish(op)
            elif isinstance(op, ForgetOp):
                self._forget(op.task_id, op.numbers)
                self._to_loop.resolve(op.future)
            elif isinstance(op, HeadersOp):
                self._set_headers(op.task_id, op.headers)
                self._to_loop.resolve(op.future)
            elif isinstance(op, DeleteOp):
                self._delete(op.task_id)
                self._to_loop.resolve(op.future)
            elif isinstance(op, StopOp):
                self._stop(op)
                return True
        except (StorageError, OSError) as exc:
            if isinstance(exc, OSError):
                exc = StorageError(f"storage {self.root}: {exc.strerror or exc}")
            self._to_loop.resolve(op.future, exc=exc)
            if isinstance(op, OpenOp):
                self._closed = exc
                self._release(clean=False)
                return True
        return False

    def _open(self) -> RecoveryReport:
        self._lock_fd = open_root(self.root)
        try:
            clean = take_marker(self.root)
        except OSError as exc:
            raise StorageError(f"storage dir {self.root}: {exc.strerror or exc}") from exc
        self._db = MetadataDB(self.root / DB_NAME)
        report = recover(self.root, self._db, clean=clean)
        self._tasks.update(
            (t.meta.task_id, WriterTask(t.meta, PieceSet.of_digests(t.digests))) for t in report.tasks
        )
        return report

    def _has_pending(self, task_id: str) -> bool:
        task = self._tasks.get(task_id)
        return task is not None and bool(task.pending)

    def _write(self, op: WriteOp) -> None:
        if not op.claim():
            return  # the caller was cancelled before the write started
        try:
            task = self._tasks.get(op.task_id)
            if task is None:
                raise StorageError(f"piece {op.number}: unknown task {short(op.task_id)}")
            view = memoryview(op.data).cast("B")  # type: ignore[arg-type]
            size = len(view)
            try:
                pwrite_all(self._fds.get(op.task_id), view, op.offset)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise StorageError(
                    f"cannot write piece {op.number} of task {short(op.task_id)}: {reason}"
                ) from exc
            finally:
                view.release()
        except StorageError as exc:
            op.data = None
            self.counters.write_errors += 1
            self._to_loop.resolve(op.future, exc=exc)
            return
        op.data = None  # the caller may reuse the buffer once the future resolves
        self.counters.pending_records += op.number not in task.pending  # written again: still one record
        task.pending[op.number] = op.digest
        task.recorded.add(op.number)
        self.counters.pieces_written += 1
        self.counters.bytes_written += size
        self._group_commit.mark_dirty(op.task_id)
        self._to_loop.resolve(op.future)

    def _create(self, meta: TaskMeta) -> None:
        existing = self._tasks.get(meta.task_id)
        if existing is not None:
            if existing.meta != meta:
                raise StorageError(f"task {short(meta.task_id)} already exists with another layout or URL")
            return
        assert self._db is not None
        self._db.drop_leftovers(meta.task_id)  # of a deletion whose transaction failed: never reused
        fd, new_dirs = create_task_file(self.root, meta)
        self._fds.add(meta.task_id, fd)
        self._group_commit.add_new_dirs(new_dirs)
        self._tasks[meta.task_id] = WriterTask(meta, PieceSet(meta.piece_count), in_db=False)
        self._group_commit.mark_dirty(meta.task_id)

    def _finish(self, op: FinishOp) -> None:
        task = self._tasks.get(op.task_id)
        if task is None:
            raise StorageError(f"cannot finish unknown task {short(op.task_id)}")
        count = task.meta.piece_count
        if len(task.recorded) != count:
            raise StorageError(
                f"cannot finish task {short(op.task_id)}: {len(task.recorded)} of {count} pieces stored"
            )
        task.finish_waiters.append(op.future)
        self._group_commit.mark_dirty(op.task_id, at_once=True)

    def _forget(self, task_id: str, numbers: list[int] | None) -> None:
        """Drop the pieces' (None: every) pending records now, their durable ones at a commit run at once."""
        if (task := self._tasks.get(task_id)) is not None:
            numbers = list(task.recorded) if numbers is None else numbers
            self.counters.pending_records -= task.drop(numbers)
            if task.in_db and numbers:  # durable records may be among them
                task.forgotten = task.forgotten.union(numbers)
                self._group_commit.mark_dirty(task_id, at_once=True)

    def _set_headers(self, task_id: str, headers: dict[str, str]) -> None:
        if (task := self._tasks.get(task_id)) is not None:
            task.meta = dataclasses.replace(task.meta, response_headers=headers)
            task.headers_changed = task.in_db  # a task not in the db yet is inserted with them
            self._group_commit.mark_dirty(task_id)

    def _delete(self, task_id: str) -> None:
        task = self._tasks.pop(task_id, None)
        self._group_commit.task_deleted(task_id)
        if task is not None:
            self.counters.pending_records -= len(task.pending)
            gone = StorageError(f"task {short(task_id)} was deleted")
            for fut in task.finish_waiters:
                self._to_loop.resolve(fut, exc=gone)
        assert self._db is not None
        # Records first: a crash in between leaves a file without a record, which recovery removes. The
        # file goes even when the records cannot (a full or locked db): records without a file are
        # dropped at the next start, and a new task of this id deletes them before it is created.
        try:
            with self._db.transaction() as conn:
                MetadataDB.delete_tasks(conn, [task_id])
        finally:
            self._fds.close(task_id)
            remove_task_file(self.root, task_id)

    def _stop(self, op: StopOp) -> None:
        self._group_commit.stop(clean=op.clean)
        self._closed = StorageError("storage is closed")
        errors = self._release(clean=op.clean)
        exc = StorageError(f"closing storage {self.root}: {errors[0]}") if errors else None
        self._to_loop.resolve(op.future, exc=exc)

    def _release(self, *, clean: bool) -> list[str]:
        """Close files and the database; at a clean stop, write the marker. Returns error lines."""
        self._fds.close_all()
        errors = [] if self._db is None else self._db.close_reporting(checkpoint=clean)
        self._db = None
        if clean and self._lock_fd >= 0:
            errors += write_marker_reporting(self.root)
        release_root(self._lock_fd)
        self._lock_fd = -1
        return errors
