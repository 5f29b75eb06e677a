"""Group commits of the storage writer thread: when pending piece records become durable, and how.

Rules:
- Everything here runs in the writer thread (writer.py), which owns the task state it reads and changes.
- A piece's record is *pending* once its bytes are pwritten and becomes *durable* at the next group
  commit: fdatasync of every task file with pending records FIRST, then all their records in one SQLite
  transaction. The fdatasyncs run in the `Syncer`'s thread (syncer.py) while the writer goes on writing:
  a flush on a busy disk must not hold back the pieces queued behind it. One commit is in flight at a
  time; at a stop the writer finishes it here, then (clean stop) commits what is left synchronously.
- A group commit runs at least every `commit_interval_s` while anything is dirty, and at once when a task
  is finished (the finish resolves only when durable) or pieces are forgotten (their durable records go
  in that commit).
- After a failed fdatasync the page cache of that file cannot be trusted: the pending records are
  dropped and `on_lost(task_id, pieces)` tells the loop, which must stop serving and using them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dfly.common.errors import StorageError
from dfly.daemon.storage.db import MetadataDB
from dfly.daemon.storage.files import TaskFds
from dfly.daemon.storage.model import NO_PIECES, Counters, WriterTask, short
from dfly.daemon.storage.ops import LoopCalls
from dfly.daemon.storage.syncer import Syncer, SyncFile, SyncJob

log = logging.getLogger(__name__)


class GroupCommit:
    """Which tasks are dirty, when the next commit is due, and the one commit in flight."""

    def __init__(
        self,
        tasks: dict[str, WriterTask],
        fds: TaskFds,
        current_db: Callable[[], MetadataDB | None],
        counters: Counters,
        to_loop: LoopCalls,
        commit_interval_s: float,
        deliver: Callable[[SyncJob], None],
        on_commit: Callable[[int], None],
        on_lost: Callable[[str, list[int]], None] | None,
    ) -> None:
        self._tasks = tasks  # the writer's own dict, changed in place only
        self._fds = fds
        self._current_db = current_db
        self._counters = counters
        self._to_loop = to_loop
        self.commit_interval_s = commit_interval_s
        self._on_commit = on_commit
        self._on_lost = on_lost
        self._syncer = Syncer(deliver)  # `deliver` puts a flushed job back on the writer's queue
        self._in_flight: SyncJob | None = None  # the commit whose flush is running
        self._dirs_to_sync: set[Path] = set()
        self._dirty_tasks: set[str] = set()  # tasks with pending records, no record yet, or finishing
        self._dirty_since: float | None = None
        self._commit_now = False

    @property
    def sync_ident(self) -> int | None:
        return self._syncer.ident

    def start_syncer(self) -> None:
        self._syncer.start()

    def mark_dirty(self, task_id: str, *, at_once: bool = False) -> None:
        self._dirty_tasks.add(task_id)
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self._commit_now = self._commit_now or at_once

    def add_new_dirs(self, dirs: Iterable[Path]) -> None:
        """Directories to fsync at the next commit (they hold a new file's name)."""
        self._dirs_to_sync.update(dirs)

    def task_deleted(self, task_id: str) -> None:
        self._dirty_tasks.discard(task_id)

    def deadline(self) -> float | None:
        """When the next commit is due; None while nothing is dirty or a commit is in flight."""
        if self._dirty_since is None or self._in_flight is not None:
            return None
        return self._dirty_since + self.commit_interval_s

    def start_if_due(self, deadline: float | None) -> None:
        """Start a commit when one is wanted at once or `deadline` (from `deadline()`) has passed."""
        due = deadline is not None and time.monotonic() >= deadline
        if self._commit_now or due:
            self._start_commit()

    def stop(self, *, clean: bool) -> None:
        """At the writer's stop: end the commit in flight, then (clean) commit the rest synchronously."""
        if self._in_flight is not None:  # its flush is done or nearly: finish it here, not from the queue
            job = self._in_flight
            job.done.wait()
            self.complete(job)
        if clean and (self._dirty_since is not None or self._commit_now):
            job = self._take_job()
            job.run()
            self.complete(job)
        self._syncer.stop()

    def abandon(self, error: StorageError) -> None:
        """The writer thread failed: fail the finish waiters of the commit in flight, end the syncer."""
        if self._in_flight is not None:
            for futures in self._in_flight.waiters.values():
                self._to_loop.resolve_all(futures, error)
        self._syncer.stop(wait=False)

    def _start_commit(self) -> None:
        """Start a group commit unless one is in flight: its flush runs in the syncer's thread."""
        if self._in_flight is None:
            self._in_flight = self._take_job()
            self._syncer.submit(self._in_flight)

    def _take_job(self) -> SyncJob:
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

    def complete(self, job: SyncJob) -> None:
        """The flush is done: record what it covered in one transaction, resolve the finish waiters."""
        self._in_flight = None
        db = self._current_db()
        assert db is not None
        live = [t for t in job.tasks if self._tasks.get(t.meta.task_id) is t]
        live_ids = {id(t) for t in live}
        for task in job.tasks:  # deleted meanwhile: the deletion failed the waiters it still held
            if id(task) not in live_ids:
                self._to_loop.resolve_all(
                    job.waiters.pop(task.meta.task_id, []), StorageError("task was deleted")
                )
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
            self._record(db, job, synced)

    def _record(self, db: MetadataDB, job: SyncJob, synced: list[WriterTask]) -> None:
        """One transaction for the flushed tasks: only the records still pending as they were flushed
        (not one forgotten or replaced meanwhile); a finish only once every piece is durable."""
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
            with db.transaction() as conn:
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
        self._counters.commits += 1
        self._counters.pieces_durable += len(covered)
        self._counters.pending_records -= len(covered)
        for task, n, _ in covered:
            del task.pending[n]
        for task in synced:
            task.forgotten = NO_PIECES
            task.in_db, task.headers_changed = True, False
        for task in finishing:
            futures = job.waiters[task.meta.task_id]
            if id(task) in done:
                self._to_loop.resolve_all(futures)
            elif len(task.recorded) == task.meta.piece_count:  # a piece written again meanwhile
                task.finish_waiters[:0] = futures
                self.mark_dirty(task.meta.task_id, at_once=True)
            else:
                self._to_loop.resolve_all(
                    futures, StorageError(f"task {short(task.meta.task_id)} lost pieces")
                )
        self._to_loop.call(self._on_commit, self._counters.commits)

    @staticmethod
    def _durably_complete(task: WriterTask, covered: list[tuple[WriterTask, int, int]]) -> bool:
        """Every piece recorded and, after this commit, none of them pending."""
        mine = sum(1 for t, _, _ in covered if t is task)
        return len(task.recorded) == task.meta.piece_count and len(task.pending) == mine

    def _commit_failed(
        self, tasks: list[WriterTask], job: SyncJob, reason: str, *, drop_pending: bool = False
    ) -> None:
        log.error("group commit failed: %s", reason)
        self._counters.commit_errors += 1
        error = StorageError(f"group commit failed: {reason}")
        for task in tasks:
            self._to_loop.resolve_all(job.waiters.pop(task.meta.task_id, []), error)
            if drop_pending:  # all of them: a piece written during the flush may have been in it
                lost = sorted(task.pending)
                self._counters.pending_records -= task.drop(lost)
                if lost and self._on_lost is not None:
                    self._to_loop.call(self._on_lost, task.meta.task_id, lost)
            if task.pending or task.forgotten or task.headers_changed or not task.in_db:
                self.mark_dirty(task.meta.task_id)  # retried at the next commit
