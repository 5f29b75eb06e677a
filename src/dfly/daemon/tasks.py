"""The daemon's tasks: one live task per task id, shared by every request that names it.

`TaskManager` is the local API's backend (dfget downloads, stats), the piece server's provider (what
this host can upload) and the control service's target (seed triggers). A request attaches to the live
task of its id, starting a Conductor only when no attempt is running; a finished task in storage is
served without touching the network.

Rules:
- One attempt (Conductor) per task id at a time; a failed attempt is replaced by the next request,
  keeping the pieces it stored.
- Downloads started by a request end with the task, not with the request: a dfget that goes away does
  not cancel a download other requests (or the swarm) may still need.
- Every asyncio task created here is owned by `_tasks` and cancelled at close.
- A task is *in use* while an attempt runs, a local download (dfget, proxy response) reads it or a child
  is connected to it (`hold`); the storage GC removes only tasks not in use. `last_used` (wall clock) is
  set by each request, trigger and end of use; after a restart it starts from the task file's mtime.
- A removed task (GC, failed digest) is forgotten here first, so nothing new attaches to it, then its
  file is deleted and every scheduler is told (DeleteTask; one that cannot take it now is told later).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Collection, Coroutine, Iterator
from typing import Any, TypeVar

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import DflyError, StaleCopy, StorageError
from dfly.common.ids import redact_url
from dfly.daemon.attempt_terms import client_timed_out
from dfly.daemon.conductor import Conductor, PiecesLost
from dfly.daemon.context import DaemonContext
from dfly.daemon.core.gc_policy import CachedTask
from dfly.daemon.core.task_state import Announcer, TaskState
from dfly.daemon.live_task import LiveTask, ServedTaskView, Usage
from dfly.daemon.local_api_messages import DownloadEvent, DownloadRequest, Finished, PiecesReady, Started
from dfly.daemon.storage import StoredTask
from dfly.daemon.stored_check import StoredCheck
from dfly.daemon.task_request import TaskRequest

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskManager:
    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self._live: dict[str, LiveTask] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False  # after close(), background work is cancelled as it is spawned
        self._forget_records = ctx.storage.forget_pieces
        self.stored_check = StoredCheck(ctx, self._spawn, self._is_current)

    # -- start-up / shutdown ----------------------------------------------------------------------
    def load(self, stored: list[StoredTask]) -> None:
        """Tasks that survived in storage: finished ones are served, partial ones resumed on demand and
        served once the attempt confirmed them (task_file.py)."""
        for task in stored:
            state = self._new_state(task.meta.task_id, task.meta.url)
            state.set_layout(task.meta.content_length, task.meta.piece_length)
            state.response_headers = dict(task.meta.response_headers)
            state.load_digests(task.digests)
            live = LiveTask(state, usage=Usage(task.mtime), unchecked=state.available_count > 0)
            if task.finished and state.complete:
                live.file_ready.set()
                state.end(None)
            self._live[state.task_id] = live

    async def close(self) -> None:
        """Cancel every task this manager owns, also those started while the first ones were ending;
        anything spawned later (a child's corrupt-piece report before the piece server closes) is
        cancelled at once."""
        self._closed = True
        while self._tasks:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks.difference_update(pending)

    def finished_tasks(self, only: Collection[str] | None = None) -> Iterator[pb.FinishedTask]:
        """The tasks held complete (all of them, or those of `only` held), as AnnounceHost lists them;
        built as the caller takes them (a cache of 50,000 tasks took 0.2 s to build at once), from the
        tasks known when called."""
        lives = list(self._live.values()) if only is None else [v for t in only if (v := self._live.get(t))]
        for live in lives:
            state = live.state
            if self._live.get(state.task_id) is not live:
                continue  # removed (or replaced) while earlier chunks went out: not held any more
            if state.complete and state.ended and state.error is None and state.layout is not None:
                yield (
                    pb.FinishedTask(
                        task_id=state.task_id,
                        peer_id=f"{self.ctx.host_id}-stored-{state.task_id}",  # a peer per task
                        content_length=state.layout.content_length,
                        piece_length=state.layout.piece_length,
                        piece_digests=state.digests_in_order(),
                        url=redact_url(state.url),  # for people only: no user info or query leaves
                    )
                )

    # -- attaching --------------------------------------------------------------------------------
    def start(self, request: TaskRequest) -> LiveTask:
        """The live task for `request`, with a download attempt running unless it is complete."""
        tid = request.task_id
        live = self._live.get(tid)
        if live is None:
            live = LiveTask(self._new_state(tid, request.url))
            self._live[tid] = live
        elif live.state.ended and (live.state.error is not None or not live.state.complete):
            old = live.state
            fresh = self._new_state(tid, request.url)
            fresh.response_headers = dict(old.response_headers)  # the validators of the pieces kept
            if old.layout is not None:
                fresh.set_layout(old.layout.content_length, old.layout.piece_length)
                fresh.load_pieces(
                    {n: d for n in old.available_pieces() if (d := old.piece_digest(n)) is not None}
                )
            live = LiveTask(fresh, usage=live.usage)  # its file is confirmed again (task_file.py)
            self._live[tid] = live
        live.usage.last_used = time.time()
        if live.state.complete and live.state.ended:
            return live
        if live.running and live.conductor is not None:
            live.conductor.attach(request)  # it serves this client too: its deadline, its origin rule
        elif not live.running:
            conductor = Conductor(self.ctx, live.state, request, live.file_ready)
            live.conductor = conductor
            attempt = asyncio.create_task(conductor.run(), name=f"download-{tid[:12]}")
            live.attempt = attempt
            self._tasks.add(attempt)
            attempt.add_done_callback(functools.partial(self._attempt_done, live))
        return live

    def _new_state(self, task_id: str, url: str) -> TaskState:
        state = TaskState(task_id, url)
        state.on_forget = self._forget_records  # a forgotten piece's storage record goes too
        return state

    def evict(self, task_id: str) -> None:
        """Forget a task whose bytes proved wrong as a whole (a registry blob failing its digest): no longer
        served, its file deleted, and the next request downloads it afresh."""
        if task_id in self._live:
            log.error("task %s evicted: its content does not match the digest it was asked for", task_id[:12])
            self.remove(task_id)

    def remove(self, task_id: str) -> asyncio.Task[None] | None:
        """Forget the task and cancel its attempt; its file is deleted (the returned asyncio task, None
        if the task was unknown), then the schedulers are told."""
        live = self._live.pop(task_id, None)
        if live is None:
            return None
        if live.attempt is not None and not live.attempt.done():
            live.attempt.cancel()
        return self._spawn(self._delete(task_id))

    async def _delete(self, task_id: str) -> None:
        try:
            await self.ctx.storage.delete_task(task_id)
        except StorageError as exc:
            log.error("task %s: %s", task_id[:12], exc)
        if self.ctx.scheduler is not None and task_id not in self._live:  # not downloaded again meanwhile
            self._spawn(self.ctx.scheduler.delete_task(task_id))  # not waited for: it may take seconds

    def _is_current(self, live: LiveTask) -> bool:
        return self._live.get(live.state.task_id) is live

    def _spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        if self._closed:
            task.cancel()
        return task

    def cached_tasks(self) -> list[CachedTask]:
        """What the storage GC decides on: every task with its size, last use and whether it is in use."""
        out = []
        for task_id, live in self._live.items():
            meta = self.ctx.storage.task_meta(task_id)
            size = meta.content_length if meta is not None else 0
            out.append(CachedTask(task_id, size, live.usage.last_used, live.in_use))
        return out

    def _file_intact(self, live: LiveTask) -> bool:
        """Whether a complete task's file is still there and whole (someone may have deleted or truncated
        it under the daemon); if not, it is logged, and the caller downloads the task again."""
        task_id, layout = live.state.task_id, live.state.layout
        assert layout is not None
        try:
            size = os.fstat(self.ctx.storage.read_fd(task_id)).st_size
        except (StorageError, OSError) as exc:
            log.warning("task %s: its file is gone (%s); downloading it again", task_id[:12], exc)
            return False
        if size < layout.content_length:
            log.warning(
                "task %s: its file has %d of %d bytes; downloading it again",
                task_id[:12],
                size,
                layout.content_length,
            )
            return False
        return True

    def pieces_lost(self, task_id: str, pieces: list[int]) -> None:
        """Storage dropped these written pieces (failed fdatasync): never serve or use them again."""
        live = self._live.get(task_id)
        if live is None:
            return
        log.error(
            "task %s: %d pieces were not synced to disk; they are fetched again", task_id[:12], len(pieces)
        )
        live.state.forget_pieces(pieces)
        if live.running and live.conductor is not None:
            live.conductor.events.put_nowait(PiecesLost(pieces))

    def _attempt_done(self, live: LiveTask, attempt: asyncio.Task[None]) -> None:
        self._tasks.discard(attempt)
        if not attempt.cancelled() and attempt.exception() is not None:
            log.error("download attempt crashed", exc_info=attempt.exception())
        if live.attempt is attempt:  # the ended attempt's conductor (its parents, buffers) is let go
            live.attempt = live.conductor = None
        if isinstance(live.state.error, StaleCopy) and self._live.get(live.state.task_id) is live:
            log.warning("task %s: %s", live.state.task_id[:12], live.state.error)
            self.remove(live.state.task_id)  # the next download starts afresh
            return
        self._forget_if_failed(live)

    def _forget_if_failed(self, live: LiveTask) -> None:
        """A failed task that stored nothing (an origin 404, a refused request) is forgotten once nobody
        reads its outcome: kept, each would hold memory until the GC's TTL, which only counts files."""
        state = live.state
        if (
            self._live.get(state.task_id) is live
            and state.ended
            and state.error is not None
            and not live.in_use
            and self.ctx.storage.task_meta(state.task_id) is None
        ):
            del self._live[state.task_id]

    async def download(self, request: DownloadRequest) -> AsyncIterator[DownloadEvent]:
        task_request = TaskRequest(
            url=request.url,
            tag=request.tag,
            application=request.application,
            filtered_query_params=request.filtered_query_params,
            headers=request.headers,
            piece_length=request.piece_length,
            timeout_s=request.timeout_s,
            disable_back_to_source=request.disable_back_to_source,
            allowed_origins=request.allowed_origins,
        )
        held = self._live.get(task_request.task_id)
        if held is not None and held.unchecked:
            await self.stored_check.before_first_use(held)
        live = await self._start_after_ending(task_request)
        if live.state.complete and live.state.ended and not self._file_intact(live):
            removal = self.remove(live.state.task_id)
            if removal is not None:
                await asyncio.shield(removal)  # a client leaving now does not cut the removal short
            live = self.start(task_request)
        local_hit = live.state.complete and live.state.ended
        loop = asyncio.get_running_loop()
        deadline = loop.time() + task_request.timeout_s  # this client's own, whoever else waits
        wake = asyncio.Event()
        announcer = Announcer(live.state)
        unsubscribe = live.state.subscribe(lambda _n: wake.set())
        remove_end = live.state.on_end(lambda _err: wake.set())
        release = live.usage.hold()
        try:
            while not live.file_ready.is_set() and not live.state.ended:
                wake.clear()
                waiters = [asyncio.ensure_future(live.file_ready.wait()), asyncio.ensure_future(wake.wait())]
                try:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise client_timed_out(task_request)
                    await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
            if not live.file_ready.is_set():
                raise _fresh(live.state.error) or DflyError("download ended before it started")
            layout = live.state.layout
            assert layout is not None
            yield Started(
                task_id=live.state.task_id,
                content_length=layout.content_length,
                piece_length=layout.piece_length,
                task_path=str(self.ctx.storage.task_path(live.state.task_id)),
                read_fd=self.ctx.storage.read_fd(live.state.task_id),
                response_headers=dict(live.state.response_headers),
            )
            announcer.start()
            while True:
                wake.clear()
                ended = live.state.ended
                if fresh := announcer.take():
                    yield PiecesReady(tuple(fresh))
                if ended:
                    if (error := _fresh(live.state.error)) is not None:
                        raise error
                    if announcer.told_count != layout.piece_count:
                        raise StorageError("task ended without all its pieces")
                    if local_hit:
                        self.ctx.counters.downloaded("local_peer", layout.content_length)
                    yield Finished()
                    return
                try:
                    async with asyncio.timeout_at(deadline):
                        await wake.wait()
                except TimeoutError:
                    raise client_timed_out(task_request) from None
        finally:
            release()
            unsubscribe()
            announcer.unsubscribe()
            remove_end()
            self._forget_if_failed(live)

    def trigger(self, request: TaskRequest) -> str:
        """A download requested by the scheduler (seed trigger): runs in the background. For a task held
        completely already, the schedulers are told again (one that never heard of it may be asking).
        A partial task held from an earlier run resumes once it has been read back (stored_check.py)."""
        held = self._live.get(request.task_id)
        if held is not None and held.unchecked and not held.state.complete:
            self._spawn(self._trigger_checked(held, request))  # no download resumes on unchecked pieces
            return request.task_id
        return self._trigger_now(request)  # a complete one is announced at once (children check CRCs)

    async def _trigger_checked(self, held: LiveTask, request: TaskRequest) -> None:
        await self.stored_check.before_first_use(held)
        if self._live.get(request.task_id) is held:  # not removed meanwhile
            self._trigger_now(request)

    async def _start_after_ending(self, request: TaskRequest) -> LiveTask:
        """`start`, except that an attempt whose time is up (a client before this one gave the deadline)
        is let end first, so this request gets a new attempt and not the old one's timeout."""
        live = self.start(request)
        if live.conductor is not None and live.attempt is not None and live.conductor.ending():
            await asyncio.wait({live.attempt})  # it ends within its TaskGroup's wind-down
            live = self.start(request)
        return live

    def _trigger_now(self, request: TaskRequest) -> str:
        live = self.start(request)
        if live.conductor is not None and live.conductor.ending():  # the scheduler waits for this seed
            self._spawn(self._start_after_ending(request))
        if live.state.complete and live.state.ended and self.ctx.scheduler is not None:
            self._spawn(self.ctx.scheduler.reannounce(only=[live.state.task_id]))
        return live.state.task_id

    # -- stats and the piece server's view --------------------------------------------------------
    def stats(self) -> dict[str, object]:
        ring = self.ctx.scheduler
        return {
            "host_id": self.ctx.host_id,
            "tasks": len(self._live),
            "running": sum(1 for live in self._live.values() if live.running),
            "scheduler_deletes_pending": 0 if ring is None else ring.undelivered_deletes(),
            **self.ctx.counters.stats(),
        }

    def holds(self, task_id: str) -> bool:
        """Whether the task is known here (stored, downloading or downloaded), i.e. not removed."""
        return task_id in self._live

    def lookup(self, task_id: str) -> ServedTaskView | None:
        live = self._live.get(task_id)
        if live is None or live.state.layout is None or not live.file_ready.is_set():
            return None
        return ServedTaskView(
            live,
            lambda: self.ctx.storage.read_fd(task_id),
            lambda number: self.stored_check.reported(live, number),
            lambda: self._is_current(live),
        )


def _fresh(error: DflyError | None) -> DflyError | None:
    """A copy of the task's stored error to raise: raising the stored one would attach the frames it
    passes through (a proxy response's buffers among them) to the task's state until it is used again."""
    return None if error is None else copy.copy(error)


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A background task's unexpected error is logged when it happens (not as "Task exception was never
    retrieved" whenever the task is collected, if ever)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task %s failed", task.get_name(), exc_info=error)
