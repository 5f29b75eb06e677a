"""`Storage`: the daemon's asyncio-facing piece store (DESIGN.md §5 "Storage and crash model").

Job: keep one preallocated file per task (`tasks/{id[:3]}/{id}`) and the durable piece records in
SQLite (`metadata.db`, WAL), recover both after clean and unclean stops, and hand out read-only fds for
sendfile and for dfget.

Rules:
- Every pwrite, fdatasync and SQLite call runs on the one writer thread (`writer.py`); the event loop
  only validates arguments, enqueues operations, awaits futures and opens the cached read-only fds.
- `write_piece` resolves once the bytes are written: the piece is *available* (may be served and
  announced). Its record is *durable* after the next group commit, which runs at least every
  `commit_interval_s` while anything is dirty and at once on `finish_task` (which resolves when durable).
- The caller may reuse the buffer passed to `write_piece` once it returns or raises, also when it was
  cancelled (a cancelled write the thread has already started is waited for).
- `open` removes the clean-shutdown marker; `close` writes it after the final group commit.
  `close(clean=False)` is a test hook that stops like a crash: no final commit, no marker.
- Open task fds are bounded whatever the number of tasks: at most MAX_READ_FDS read-only ones here
  and the writer's MAX_OPEN_FILES, least recently used closed first. So an fd from `read_fd` is valid
  only until the caller's next await; whoever keeps it longer `os.dup`s it at once.
- `forget_pieces` (bytes found to be of another object) drops the pieces' records, durable ones and
  those of writes submitted before it, at once (a group commit follows); writes submitted after it are
  recorded as usual. So a restart never trusts a forgotten piece. `set_response_headers` records the
  validators of the object the task now holds, committed after such a forget.
- Errors are `StorageError` with one line; a failed write fails only its own piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dfly.common.errors import StorageError
from dfly.daemon.storage.model import StoredTask, TaskMeta, check_meta, short, task_relpath
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
)
from dfly.daemon.storage.recovery import RecoveryReport
from dfly.daemon.storage.writer import WriterThread

MAX_READ_FDS = 256  # read-only task fds kept open (the writer keeps up to as many for writing)


class Storage:
    def __init__(self, root: Path, *, commit_interval_s: float = 1.0) -> None:
        if commit_interval_s <= 0:
            raise ValueError("commit_interval_s must be positive")
        self.root = Path(root)
        self.commit_interval_s = commit_interval_s
        self.recovery: RecoveryReport | None = None  # what open() found (counts only)
        self._writer: WriterThread | None = None
        self._closed = False
        self._tasks: dict[str, TaskMeta] = {}
        self._stored_bytes = 0  # the content lengths of _tasks, kept as they come and go
        self._read_fds: OrderedDict[str, int] = OrderedDict()
        self._commits = 0
        self._commit_waiters: list[asyncio.Future[None]] = []
        # Called on the loop with (task_id, pieces) when a failed fdatasync dropped written pieces.
        self.on_pieces_lost: Callable[[str, list[int]], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> list[StoredTask]:
        """Recover the storage dir, start the writer thread; returns the tasks that survived."""
        if self._writer is not None or self._closed:
            raise StorageError(f"storage {self.root} was already opened")
        loop = asyncio.get_running_loop()
        writer = WriterThread(self.root, self.commit_interval_s, loop, self._on_commit, self._on_lost)
        self._writer = writer
        fut: asyncio.Future[RecoveryReport] = loop.create_future()
        writer.start(OpenOp(fut))
        try:
            report = await fut
        except BaseException:  # the open failed (the thread ends by itself), or this caller was cancelled
            self._closed = True
            with contextlib.suppress(StorageError):  # the thread has ended already
                writer.submit(StopOp(loop.create_future(), True))  # else it waited on its queue for ever
            await asyncio.to_thread(writer.join)
            raise
        self.recovery = dataclasses.replace(report, tasks=[])  # its counts: the tasks go to the caller
        self._tasks = {task.meta.task_id: task.meta for task in report.tasks}
        self._stored_bytes = sum(meta.content_length for meta in self._tasks.values())
        return report.tasks

    async def close(self, *, clean: bool = True) -> None:
        """Final group commit, stop the thread, write the clean marker; idempotent.

        `clean=False` (tests): stop as if killed — pending records are lost and no marker is written.
        """
        writer = self._writer
        if writer is None or self._closed:
            return
        self._closed = True
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        for waiter in self._commit_waiters:
            if not waiter.done():
                waiter.set_exception(StorageError("storage is closed"))
        self._commit_waiters.clear()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            writer.submit(StopOp(fut, clean))
            await fut
        finally:
            await asyncio.to_thread(writer.join)

    @property
    def was_clean(self) -> bool:
        """Whether the previous stop was clean (the marker was present at open; False for a new dir)."""
        return self.recovery is not None and self.recovery.clean

    @property
    def writer_thread_id(self) -> int | None:
        return None if self._writer is None else self._writer.ident

    @property
    def sync_thread_id(self) -> int | None:
        """The thread that runs the group commits' fdatasyncs (storage/syncer.py)."""
        return None if self._writer is None else self._writer.sync_ident

    # -- tasks -------------------------------------------------------------------------------------

    async def create_task(self, meta: TaskMeta) -> None:
        """Create and preallocate the task file; idempotent for the same meta."""
        check_meta(meta)
        await self._call(CreateOp(self._loop_future(), meta))
        if (old := self._tasks.get(meta.task_id)) is not None:
            self._stored_bytes -= old.content_length
        self._tasks[meta.task_id] = meta
        self._stored_bytes += meta.content_length

    def task_path(self, task_id: str) -> Path:
        return self.root / task_relpath(task_id)

    def task_meta(self, task_id: str) -> TaskMeta | None:
        return self._tasks.get(task_id)

    def stored_bytes(self) -> int:
        """The task files' bytes (their content lengths: files are preallocated)."""
        return self._stored_bytes

    def read_fd(self, task_id: str) -> int:
        """A cached O_RDONLY fd of the task file (don't close it). It stays valid only until the caller's
        next await: a later call may close it (at most MAX_READ_FDS are kept, least recently used go
        first), so use it at once or `os.dup` it."""
        fd = self._read_fds.get(task_id)
        if fd is not None:
            self._read_fds.move_to_end(task_id)
            return fd
        self._check_open()
        if task_id not in self._tasks:
            raise StorageError(f"unknown task {short(task_id)}")
        try:
            fd = os.open(self.task_path(task_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot open task file of {short(task_id)}: {exc.strerror or exc}") from exc
        self._read_fds[task_id] = fd
        while len(self._read_fds) > MAX_READ_FDS:
            os.close(self._read_fds.popitem(last=False)[1])
        return fd

    async def write_piece(
        self, task_id: str, number: int, offset: int, data: memoryview | bytes, digest: int
    ) -> None:
        """pwrite one piece; resolves when the bytes are written (available), durable at the next commit."""
        meta = self._tasks.get(task_id)
        if meta is None:
            raise StorageError(f"piece {number}: unknown task {short(task_id)}")
        want_offset, want_length = meta.piece_span(number)
        length = data.nbytes if isinstance(data, memoryview) else len(data)
        if offset != want_offset or length != want_length:
            raise StorageError(
                f"piece {number} of task {short(task_id)}: got offset {offset} length {length}, "
                f"expected {want_offset} and {want_length}"
            )
        op = WriteOp(self._loop_future(), task_id, number, offset, data, digest & 0xFFFFFFFF)
        self._submit(op)
        try:
            await asyncio.shield(op.future)
        except asyncio.CancelledError:
            if not op.cancel():
                await _wait_uncancellable(op.future)  # the thread is reading `data`
            raise

    async def finish_task(self, task_id: str) -> None:
        """Mark the task finished and group-commit at once; resolves when durable."""
        await self._call(FinishOp(self._loop_future(), task_id))

    def forget_pieces(self, task_id: str, numbers: Iterable[int] | None = None) -> None:
        """Drop the records of these pieces (None: every piece of the task): durable ones and those of
        every write submitted before this call; durable at the group commit this starts at once."""
        meta = self._tasks.get(task_id)
        if meta is None or self._closed:  # no records, or none can change any more
            return
        count = meta.piece_count
        forgotten = None if numbers is None else [n for n in numbers if 0 <= n < count]
        if forgotten is None or forgotten:
            self._submit_unawaited(ForgetOp(self._loop_future(), task_id, forgotten))

    def set_response_headers(self, task_id: str, headers: Mapping[str, str]) -> None:
        """Record the origin's headers (validators) of the task's object anew, at the next group commit.

        Called after `forget_pieces` of the pieces of the older object, so the new validators never
        become durable before those pieces' records are gone (the forget commits at once, first)."""
        meta = self._tasks.get(task_id)
        if meta is None or self._closed:
            return
        self._tasks[task_id] = dataclasses.replace(meta, response_headers=dict(headers))
        self._submit_unawaited(HeadersOp(self._loop_future(), task_id, dict(headers)))

    async def delete_task(self, task_id: str) -> None:
        """Remove the task's records, then its file; idempotent."""
        if (gone := self._tasks.pop(task_id, None)) is not None:
            self._stored_bytes -= gone.content_length
        fd = self._read_fds.pop(task_id, None)
        if fd is not None:
            os.close(fd)
        await self._call(DeleteOp(self._loop_future(), task_id))

    # -- commits and stats -------------------------------------------------------------------------

    @property
    def commits(self) -> int:
        """Group commits completed, as seen by the event loop."""
        return self._commits

    async def wait_for_commit(self, count: int | None = None) -> int:
        """Wait until `count` group commits have completed (default: one more than now)."""
        target = self._commits + 1 if count is None else count
        while self._commits < target:
            self._check_open()
            waiter: asyncio.Future[None] = self._loop_future()
            self._commit_waiters.append(waiter)
            await waiter
        return self._commits

    def stats(self) -> dict[str, int]:
        counters = self._writer.counters if self._writer is not None else None
        stats = {
            "tasks": len(self._tasks),
            "bytes": self.stored_bytes(),
            "open_read_fds": len(self._read_fds),
        }
        if counters is not None:
            stats.update(vars(counters))
        return stats

    # -- internals ---------------------------------------------------------------------------------

    def _on_commit(self, commits: int) -> None:
        self._commits = max(self._commits, commits)
        waiters, self._commit_waiters = self._commit_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_lost(self, task_id: str, pieces: list[int]) -> None:
        if self.on_pieces_lost is not None:
            self.on_pieces_lost(task_id, pieces)

    def _check_open(self) -> None:
        if self._writer is None:
            raise StorageError(f"storage {self.root} is not open")
        if self._closed:
            raise StorageError(f"storage {self.root} is closed")

    def _loop_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _submit(self, op: Op) -> None:
        self._check_open()
        assert self._writer is not None
        self._writer.submit(op)

    def _submit_unawaited(self, op: Op) -> None:
        """Submit an operation whose end nobody awaits. With the writer gone no record can change any
        more, so its refusal (or its future's failure) is nobody's error."""
        op.future.add_done_callback(_retrieve)
        try:
            self._submit(op)
        except StorageError:
            op.future.cancel()

    async def _call(self, op: Op) -> Any:
        self._submit(op)
        return await op.future


async def _wait_uncancellable(fut: asyncio.Future[Any]) -> None:
    """Wait for `fut` to settle, even through further cancellations; its outcome is consumed."""
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            continue
    if not fut.cancelled():
        fut.exception()  # mark retrieved


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" at garbage collection
