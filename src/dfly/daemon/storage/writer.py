"""The storage writer thread: the one thread that pwrites, owns task state and talks to SQLite (DESIGN.md §5).

Rules:
- The event loop only enqueues operations (`submit`) and gets results through futures resolved with
  `loop.call_soon_threadsafe`; it never waits on this thread's locks for longer than a state flip.
- A piece write resolves as soon as its bytes are pwritten (the piece is *available*); its record joins
  the pending set and becomes *durable* at the next group commit: fdatasync of every task file with
  pending records FIRST, then all their records in one SQLite transaction. The fdatasyncs run in the
  `Syncer`'s thread (syncer.py) while this thread goes on writing: a flush on a busy disk must not
  hold back the pieces queued behind it. One commit is in flight at a time.
- A group commit runs at least every `commit_interval_s` while anything is dirty, and at once when a task
  is finished (the finish resolves only when durable) or pieces are forgotten (their pending records go
  at once, their durable ones in that commit). Operations are taken from the queue one at a time, in
  order (a forget covers every write queued before it), so writes that queue up during a commit batch
  into the next one.
- The thread keeps no reference to a write's buffer once its future is resolved. A write whose caller
  was cancelled before the thread took it is skipped (see `WriteOp.claim`).
- After a failed fdatasync the page cache of that file cannot be trusted: the pending records are
  dropped and `on_lost(task_id, pieces)` tells the loop, which must stop serving and using them.
- Errors become `StorageError` on the future of the operation that failed; the thread goes on. An
  unexpected exception fails every queued operation and marks the writer dead, never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from asyncio import Future
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from dfly.daemon.storage.model import DB_NAME, NO_PIECES, Counters, PieceSet, TaskMeta, WriterTask, short
from dfly.daemon.storage.ops import (
    CreateOp,
    DeleteOp,
    FinishOp,
    ForgetOp,
    HeadersOp,
    Op,
    OpenOp,
    StopOp,
    WriteOp,
    settle,
)
from dfly.daemon.storage.recovery import RecoveryReport, recover
from dfly.daemon.storage.syncer import Syncer, SyncFile, SyncJob

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
        self._on_lost = on_lost
        self.commit_interval_s = commit_interval_s
        self.counters = Counters()
        self._loop = loop
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Op | SyncJob] = queue.SimpleQueue()
        self._syncer = Syncer(self._queue.put)
        self._syncing: SyncJob | None = None  # the commit whose flush is running
        self._thread = threading.Thread(target=self._main, name="dfly-storage-writer", daemon=True)
        self._closed: StorageError | None = None  # set once the thread stops taking operations
        self._submit_lock = threading.Lock()
        self._db: MetadataDB | None = None
        self._lock_fd = -1
        self._tasks: dict[str, WriterTask] = {}
        self._fds = TaskFds(root, MAX_OPEN_FILES, self._has_pending)
        self._dirs_to_sync: set[Path] = set()
        self._dirty_tasks: set[str] = set()  # tasks with pending records, no record yet, or finishing
        self._dirty_since: float | None = None
        self._commit_now = False

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    @property
    def sync_ident(self) -> int | None:
        return self._syncer.ident

    def start(self, open_op: OpenOp) -> None:
        self._queue.put(open_op)
        self._syncer.start()
        self._thread.start()

    def submit(self, op: Op) -> None:
        with self._submit_lock:  # against a race with the final drain in _fail_queued
            if self._closed is not None:
                raise self._closed
            self._queue.put(op)

    def join(self) -> None:
        self._thread.join()

    # -- resolving futures on the loop -------------------------------------------------------------

    def _resolve(self, fut: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(settle, fut, result, exc)

    # -- the thread --------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while True:
                idle = self._dirty_since is None or self._syncing is not None  # no commit to start now
                deadline = None if idle else self._dirty_since + self.commit_interval_s  # type: ignore[operator]
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    op: Op | SyncJob | None = self._queue.get(timeout=timeout)
                except queue.Empty:
                    op = None
                if isinstance(op, SyncJob):
                    self._end_commit(op)
                elif op is not None and self._handle(op):
                    break
                due = deadline is not None and time.monotonic() >= deadline
                if self._commit_now or due:
                    self._commit()
        except BaseException as exc:
            log.exception("storage writer thread failed")
            self._closed = StorageError(f"storage writer thread failed: {exc!r}")
            for task in self._tasks.values():
                self._resolve_all(task.finish_waiters, self._closed)
            if self._syncing is not None:
                for futures in self._syncing.waiters.values():
                    self._resolve_all(futures, self._closed)
            self._syncer.stop(wait=False)
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
                self._resolve(op.future, exc=closed)

    def _handle(self, op: Op) -> bool:
        """Run one operation; True when the thread must stop."""
        if isinstance(op, WriteOp):
            self._write(op)
            return False
        try:
            if isinstance(op, OpenOp):
                self._resolve(op.future, self._open())
            elif isinstance(op, CreateOp):
                self._create(op.meta)
                self._resolve(op.future)
            elif isinstance(op, FinishOp):
                self._finish(op)
            elif isinstance(op, ForgetOp):
                self._forget(op.task_id, op.numbers)
                self._resolve(op.future)
            elif isinstance(op, HeadersOp):
                self._set_headers(op.task_id, op.headers)
                self._resolve(op.future)
            elif isinstance(op, DeleteOp):
                self._delete(op.task_id)
                self._resolve(op.future)
            elif isinstance(op, StopOp):
                self._stop(op)
                return True
        except (StorageError, OSError) as exc:
            if isinstance(exc, OSError):
                exc = StorageError(f"storage {self.root}: {exc.strerror or exc}")
            self._resolve(op.future, exc=exc)
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
        self._tasks = {
            t.meta.task_id: WriterTask(t.meta, PieceSet.of_digests(t.digests)) for t in report.tasks
        }
        return report

    def _has_pending(self, task_id: str) -> bool:
        task = self._tasks.get(task_id)
        return task is not None and bool(task.pending)

    def _dirty(self, task_id: str, *, at_once: bool = False) -> None:
        self._dirty_tasks.add(task_id)
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self._commit_now = self._commit_now or at_once

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
            self._resolve(op.future, exc=exc)
            return
        op.data = None  # the caller may reuse the buffer once the future resolves
        self.counters.pending_records += op.number not in task.pending  # written again: still one record
        task.pending[op.number] = op.digest
        task.recorded.add(op.number)
        self.counters.pieces_written += 1
        self.counters.bytes_written += size
        self._dirty(op.task_id)
        self._resolve(op.future)

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
        self._dirs_to_sync.update(new_dirs)
        self._tasks[meta.task_id] = WriterTask(meta, PieceSet(meta.piece_count), in_db=False)
        self._dirty(meta.task_id)

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
        self._dirty(op.task_id, at_once=True)

    def _forget(self, task_id: str, numbers: list[int] | None) -> None:
        """Drop the pieces' (None: every) pending records now, their durable ones at a commit run at once."""
        if (task := self._tasks.get(task_id)) is not None:
            numbers = list(task.recorded) if numbers is None else numbers
            self.counters.pending_records -= task.drop(numbers)
            if task.in_db and numbers:  # durable records may be among them
                task.forgotten = task.forgotten.union(numbers)
                self._dirty(task_id, at_once=True)

    def _set_headers(self, task_id: str, headers: dict[str, str]) -> None:
        if (task := self._tasks.get(task_id)) is not None:
            task.meta = dataclasses.replace(task.meta, response_headers=headers)
            task.headers_changed = task.in_db  # a task not in the db yet is inserted with them
            self._dirty(task_id)

    def _delete(self, task_id: str) -> None:
        task = self._tasks.pop(task_id, None)
        self._dirty_tasks.discard(task_id)
        if task is not None:
            self.counters.pending_records -= len(task.pending)
            gone = StorageError(f"task {short(task_id)} was deleted")
            for fut in task.finish_waiters:
                self._resolve(fut, exc=gone)
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

    def _commit(self) -> None:
        """Start a group commit unless one is in flight: its flush runs in the syncer's thread."""
        if self._syncing is None:
            self._syncing = self._begin_commit()
            self._syncer.submit(self._syncing)

    def _begin_commit(self) -> SyncJob:
        """Take the dirty tasks, their pending records and finish waiters, and what must be flushed."""
        self._commit_now = False
        self._dirty_since = None
        dirty: list[WriterTask] = []
        files: list[SyncFile] = []
        for task_id in sorted(self._dirty_tasks):
            task = self._tasks[task_id]
            if task.pending:
                try:
                    fd = os.dup(self._fds.get(task_id))
                except OSError as exc:  # out of fds: this task waits for the next commit
                    log.warning("group commit: cannot open task %s to sync it: %s", short(task_id), exc)
                    continue
                files.append(SyncFile(task, fd, dict(task.pending)))
            dirty.append(task)
        self._dirty_tasks.difference_update(t.meta.task_id for t in dirty)
        if self._dirty_tasks:
            self._dirty_since = time.monotonic()
        dirs = sorted(self._dirs_to_sync)
        self._dirs_to_sync.clear()
        waiters = {t.meta.task_id: t.finish_waiters for t in dirty if t.finish_waiters}
        for task in dirty:
            task.finish_waiters = []
        return SyncJob(dirty, files, dirs, waiters)

    def _end_commit(self, job: SyncJob) -> None:
        """The flush is done: record what it covered in one transaction, resolve the finish waiters."""
        self._syncing = None
        assert self._db is not None
        live = [t for t in job.tasks if self._tasks.get(t.meta.task_id) is t]
        live_ids = {id(t) for t in live}
        for task in job.tasks:  # deleted meanwhile: _delete failed the waiters it still held
            if id(task) not in live_ids:
                self._resolve_all(job.waiters.pop(task.meta.task_id, []), StorageError("task was deleted"))
        if job.dir_error is not None:
            self._dirs_to_sync.update(job.dirs)
            self._commit_failed(live, job, f"cannot sync a task directory: {job.dir_error}")
            return
        failed = {id(f.task): f.error for f in job.files if f.error is not None}
        for task in live:
            if (error := failed.get(id(task))) is not None:
                # After a failed fdatasync the page cache cannot be trusted: forget these records.
                reason = f"cannot sync task {short(task.meta.task_id)}: {error.strerror or error}"
                self._commit_failed([task], job, reason, drop_pending=True)
        synced = [t for t in live if id(t) not in failed]
        if synced:
            self._record(job, synced)

    def _record(self, job: SyncJob, synced: list[WriterTask]) -> None:
        """One transaction for the flushed tasks: only the records still pending as they were flushed
        (not one forgotten or replaced meanwhile); a finish only once every piece is durable."""
        assert self._db is not None
        synced_ids = {id(t) for t in synced}
        covered = [
            (f.task, n, d)
            for f in job.files
            if id(f.task) in synced_ids
            for n, d in f.records.items()
            if f.task.pending.get(n) == d
        ]
        finishing = [t for t in synced if t.meta.task_id in job.waiters]
        done = {id(t) for t in finishing if self._durably_complete(t, covered)}
        try:
            with self._db.transaction() as conn:
                MetadataDB.insert_tasks(conn, [t.meta for t in synced if not t.in_db])
                # Forgotten records go first: a piece forgotten, then written again is both.
                MetadataDB.delete_pieces(conn, [(t.meta.task_id, n) for t in synced for n in t.forgotten])
                unfinished = [t.meta.task_id for t in synced if t.forgotten]
                MetadataDB.mark_finished(conn, unfinished, finished=False)
                MetadataDB.set_headers(conn, [t.meta for t in synced if t.headers_changed])
                MetadataDB.insert_pieces(conn, [(t.meta.task_id, n, d) for t, n, d in covered])
                MetadataDB.mark_finished(conn, [t.meta.task_id for t in finishing if id(t) in done])
        except StorageError as exc:
            self._commit_failed(synced, job, str(exc))
            return
        self.counters.commits += 1
        self.counters.pieces_durable += len(covered)
        self.counters.pending_records -= len(covered)
        for task, n, _ in covered:
            del task.pending[n]
        for task in synced:
            task.forgotten = NO_PIECES
            task.in_db, task.headers_changed = True, False
        for task in finishing:
            futures = job.waiters[task.meta.task_id]
            if id(task) in done:
                self._resolve_all(futures)
            elif len(task.recorded) == task.meta.piece_count:  # a piece written again meanwhile
                task.finish_waiters[:0] = futures
                self._dirty(task.meta.task_id, at_once=True)
            else:
                self._resolve_all(futures, StorageError(f"task {short(task.meta.task_id)} lost pieces"))
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._on_commit, self.counters.commits)

    @staticmethod
    def _durably_complete(task: WriterTask, covered: list[tuple[WriterTask, int, int]]) -> bool:
        """Every piece recorded and, after this commit, none of them pending."""
        mine = sum(1 for t, _, _ in covered if t is task)
        return len(task.recorded) == task.meta.piece_count and len(task.pending) == mine

    def _resolve_all(self, futures: list[Future[Any]], exc: BaseException | None = None) -> None:
        for fut in futures:
            self._resolve(fut, exc=exc)

    def _commit_failed(
        self, tasks: list[WriterTask], job: SyncJob, reason: str, *, drop_pending: bool = False
    ) -> None:
        log.error("group commit failed: %s", reason)
        self.counters.commit_errors += 1
        error = StorageError(f"group commit failed: {reason}")
        for task in tasks:
            self._resolve_all(job.waiters.pop(task.meta.task_id, []), error)
            if drop_pending:  # all of them: a piece written during the flush may have been in it
                lost = sorted(task.pending)
                self.counters.pending_records -= task.drop(lost)
                if lost and self._on_lost is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody serves them
                        self._loop.call_soon_threadsafe(self._on_lost, task.meta.task_id, lost)
            if task.pending or task.forgotten or task.headers_changed or not task.in_db:
                self._dirty(task.meta.task_id)  # retried at the next commit

    def _stop(self, op: StopOp) -> None:
        if self._syncing is not None:  # its flush is done or nearly: finish it here, not from the queue
            job = self._syncing
            job.done.wait()
            self._end_commit(job)
        if op.clean and (self._dirty_since is not None or self._commit_now):
            job = self._begin_commit()
            job.run()
            self._end_commit(job)
        self._syncer.stop()
        self._closed = StorageError("storage is closed")
        errors = self._release(clean=op.clean)
        exc = StorageError(f"closing storage {self.root}: {errors[0]}") if errors else None
        self._resolve(op.future, exc=exc)

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
