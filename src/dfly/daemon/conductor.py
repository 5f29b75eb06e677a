"""Drives one download attempt of a task: scheduler stream, parents, planner, back-to-source, reports.

One conductor per live task at a time; everything it learns lands in its TaskState, which the local
API, the piece server and other attachers read. All its inputs (scheduler replies, parent frames,
stored pieces, ticks) pass through one queue handled by one loop, so its state has one writer.

Rules:
- Register first; parents come from the scheduler, piece availability from the parents themselves.
- Back to the origin only when the scheduler says so, when no scheduler can be reached at the start,
  when it gives no answer within `scheduler.schedule_timeout_s`, or when its stream broke and for
  `download.no_parent_timeout_s` no parent held a missing piece (never with back-to-source disabled).
  A held copy with every piece goes there only for the stat that confirms it (task_file.py).
- A broken scheduler stream does not stop the download: the parents it has keep serving, and the
  conductor registers again (peer_stream.py), then re-reports its pieces and whether it reads the origin.
- A piece is written, then marked available, then reported (batched ≥ progress_report_interval_s
  apart, and at completion). The task completes only after the scheduler's digest cross-check
  (or without it when the scheduler is gone); its group commit runs alongside and is awaited after
  attachers have been told, so no dfget waits for the cache's fdatasync.
- While it holds fewer parents than `download.max_parents`, the child asks for more about once a second.
- The attempt serves every client attached to the task (`attach`, attempt_terms.py): it runs until
  the latest of their deadlines, and may read the origin if any of them may.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import (
    DflyError,
    DigestMismatch,
    NoParents,
    SourceError,
    StorageError,
    first_dfly_error,
    first_leaf,
    without_frames,
)
from dfly.common.ids import HostId, peer_id, redact_url
from dfly.daemon.attempt_terms import AttemptTerms
from dfly.daemon.back_to_source import BackToSource
from dfly.daemon.context import DaemonContext
from dfly.daemon.core.task_state import Layout, TaskState
from dfly.daemon.parents import ParentSet
from dfly.daemon.peer_stream import PeerStream, SchedulerGone, SchedulerReply
from dfly.daemon.task_file import TaskFile
from dfly.daemon.task_request import TaskRequest, layout_from_proto

log = logging.getLogger(__name__)

TICK_S = 0.2
VERDICT_TIMEOUT_S = 30.0
MORE_PARENTS_INTERVAL_S = 1.0  # a fallback: the scheduler pushes new parents as they appear


@dataclass(frozen=True)
class _Wake:
    """Something changed (a piece stored, a parent event): re-evaluate."""


@dataclass(frozen=True)
class PiecesLost:
    """The task state forgot these pieces: storage could not make them durable (a failed fdatasync), or
    their bytes on disk went bad (`synced` True: stored_check.py, queued only while `may_refetch`)."""

    pieces: list[int]
    synced: bool = False


class Conductor:
    def __init__(self, ctx: DaemonContext, state: TaskState, request: TaskRequest, file_ready: asyncio.Event):
        self.ctx = ctx
        self.state = state
        self.request = request
        self.file = TaskFile(ctx, state, request, file_ready)
        self.peer_id = peer_id(HostId(ctx.host_id), f"{ctx.rng.getrandbits(64):016x}")
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self.stream = PeerStream(ctx, state.task_id, self.peer_id, self.events, self.spawn)
        self._orphan_since: float | None = None  # scheduler gone and no parent can help, since
        self._back_to_source: asyncio.Task[None] | None = None
        self._verdict_deadline: float | None = None
        self._schedule_deadline: float | None = None
        self._more_parents_at = 0.0
        self._started_sent = False
        self._done = False
        self.terms = AttemptTerms.of(request, asyncio.get_running_loop().time())
        self._helpers: set[asyncio.Task[None]] = set()
        self.parents = ParentSet(self)

    # -- entry ------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Runs the attempt to its end; the outcome lands in `state.end(...)`."""
        error: DflyError | None = None
        try:
            async with self.terms.watch(), asyncio.TaskGroup() as tg:
                self.tg = tg
                await self._drive()
                self._stop_helpers()
        except TimeoutError:
            error = self.terms.timed_out()
        except asyncio.CancelledError:
            await self._close()
            self.state.end(DflyError("the daemon is shutting down"))
            raise
        except BaseException as exc:
            error = first_dfly_error(exc)
            if error is None:
                log.exception("download of %s failed", redact_url(self.request.url))
                leaf = first_leaf(exc)  # not "ExceptionGroup: unhandled errors in a TaskGroup"
                error = DflyError(f"internal error: {type(leaf).__name__}: {leaf}")
        try:
            await self._close()
        finally:
            self.ctx.counters.task_ended(error is None)
            self.state.end(None if error is None else without_frames(error))
        await self.file.durable(self.terms.started_at)

    def attach(self, request: TaskRequest) -> None:
        """Another client of the task (a download, a seed trigger) joins this attempt (attempt_terms.py)."""
        self.terms.attach(request, asyncio.get_running_loop().time())

    def ending(self) -> bool:
        """The attempt's time is up and it is winding down: a client joining now waits for a new one."""
        return self.terms.timeout is not None and self.terms.timeout.expired()

    def _stop_helpers(self) -> None:
        """The stream reader and piece writers end with the attempt."""
        self.stream.close()
        for task in list(self._helpers):
            task.cancel()
        if self._back_to_source is not None:
            self._back_to_source.cancel()

    async def _close(self) -> None:
        self.parents.close_all()
        if self._back_to_source is not None:
            self._back_to_source.cancel()
        self.stream.close()

    # -- main loop --------------------------------------------------------------------------------
    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        await self.stream.open(self._register_request())
        if not self.stream.alive:
            self._go_back_to_source(None, "no scheduler reachable")
        else:
            self._schedule_deadline = loop.time() + self.ctx.config.scheduler.schedule_timeout_s
        while not self._done:
            if self.events.empty():
                try:  # asyncio.timeout reuses this task; wait_for made a task and a future per wait
                    async with asyncio.timeout(TICK_S):
                        event = await self.events.get()
                except TimeoutError:
                    pass
                else:
                    await self._apply(event)
            # Everything queued is applied, then one step: a burst of HAVEs and stored pieces costs
            # one planner pass, not one per event (and no timer per event).
            while not self.events.empty():
                await self._apply(self.events.get_nowait())
            await self._step(loop.time())

    async def _apply(self, event: object) -> None:
        if isinstance(event, SchedulerReply):
            await self._on_reply(event.response)
        elif isinstance(event, SchedulerGone) and self.stream.is_current(event):
            self._on_scheduler_gone(event.reason)
        elif isinstance(event, PiecesLost):
            self._on_pieces_lost(event.pieces, event.synced)

    def may_refetch(self) -> bool:
        """Whether pieces taken back now (PiecesLost) are fetched again by this attempt."""
        return self._back_to_source is None and self._verdict_deadline is None and self.parents.active

    def _on_pieces_lost(self, pieces: list[int], synced: bool) -> None:
        """Fetch them again from parents; after a failed sync, an origin read (sequential) or a finished
        attempt ends with a clear error instead, and the next request resumes from the pieces that are
        still good. Bad bytes found on disk were queued while parents could refetch: an origin read begun
        since then found them missing at its start, so only the parents' plan needs them again."""
        if synced:
            if self._back_to_source is None:
                self.parents.pieces_lost(pieces)
            return
        if not self.may_refetch():
            raise StorageError(f"{len(pieces)} pieces could not be synced to disk; download again")
        self.parents.pieces_lost(pieces)

    async def _step(self, now: float) -> None:
        await self.parents.pump(now)
        if not self._started_sent and self.parents.connected:
            self._started_sent = True
            await self.stream.send(started=pb.PeerStarted())
        if self._back_to_source is not None and self._back_to_source.done():
            self._back_to_source.result()  # re-raises the origin's error
        if self.state.complete and self._verdict_deadline is None and self.file.ready.is_set():
            await self._complete(now)  # (a held copy complete from the start is confirmed first)
        elif self._verdict_deadline is not None and now >= self._verdict_deadline:
            log.warning("no digest verdict from the scheduler for %s; accepting", self.state.task_id[:12])
            self._done = True
        elif self._schedule_deadline is not None and now >= self._schedule_deadline:
            self._schedule_deadline = None
            self._go_back_to_source(None, "the scheduler gave no parent in time")
        self._check_orphan(now)
        if self.stream.pieces_due(now, self.ctx.config.download.progress_report_interval_s):
            await self.stream.flush_pieces(now)
        if (
            self.parents.active
            and not self.state.complete
            and self._back_to_source is None
            and len(self.parents) < self.ctx.config.download.max_parents
            and now >= self._more_parents_at
            and self.stream.alive  # reports taken while no stream is up would be lost
        ):
            self._more_parents_at = now + MORE_PARENTS_INTERVAL_S
            report = self.parents.take_failed()  # reported now, not only when all fail
            report.more_parents, report.description = True, "more parents"
            await self.stream.reschedule(report)
        if self.parents.active and self.parents.stalled() and self._back_to_source is None:
            report = self.parents.take_failed() if self.stream.alive else pb.Reschedule()
            report.description = "no working parent"
            self.parents.active = False
            self._schedule_deadline = now + self.ctx.config.scheduler.schedule_timeout_s
            await self.stream.reschedule(report)

    async def _on_reply(self, response: pb.AnnouncePeerResponse) -> None:
        kind = response.WhichOneof("response")
        if kind == "candidate_parents":
            reply = response.candidate_parents
            layout = layout_from_proto(reply.layout)
            if layout is None or self._back_to_source is not None:
                return
            await self.file.ensure(layout, dict(reply.layout.response_headers))
            self._schedule_deadline = None
            log.debug("task %s: %d candidate parents", self.state.task_id[:12], len(reply.parents))
            self.parents.add_candidates(list(reply.parents))
        elif kind == "need_back_to_source":
            reply_bts = response.need_back_to_source
            self._go_back_to_source(layout_from_proto(reply_bts.layout), reply_bts.description)
        elif kind == "failed":
            failed = response.failed
            if failed.HasField("source_error") and (
                failed.source_error.status_code or failed.source_error.message
            ):
                err = failed.source_error
                raise SourceError(err.message or failed.description, err.status_code, dict(err.headers))
            if (
                self.terms.origin_allowed
                and self.request.disable_back_to_source
                and self._back_to_source is None
                and self._verdict_deadline is None
                and not self.state.complete
            ):  # registered as a download that must not read the origin; a client that may has joined
                self._go_back_to_source(
                    None, f"no parent ({failed.description}), and a client allows the origin"
                )
                return
            raise NoParents(failed.description or "the scheduler failed the download")
        elif kind == "finish_verdict":
            verdict = response.finish_verdict
            if verdict.accepted:
                self._done = True
                return
            bad = list(verdict.bad_pieces)
            log.warning(
                "scheduler rejected %d pieces of %s; fetching them again", len(bad), self.state.task_id[:12]
            )
            if self._back_to_source is not None or not self.parents.active:
                raise DigestMismatch(f"{len(bad)} pieces differ from the origin's digests")
            self.state.forget_pieces(bad)
            self.parents.refetch(bad)
            self._verdict_deadline = None

    def _on_scheduler_gone(self, reason: str) -> None:
        self.stream.alive = False
        if self._verdict_deadline is not None:
            self._done = True  # nothing left to cross-check against
            return
        if self._done:
            return
        if self.state.complete:  # a held copy: the origin's stat confirms it, if it is not confirmed yet
            self._go_back_to_source(None, "the scheduler left before this host's copy was confirmed")
            return
        task = self.state.task_id[:12]
        log.warning("task %s: scheduler stream ended (%s); registering again", task, reason)
        self.spawn(self.stream.reregister(self._register_request, self._restore, self._wants_scheduler))

    def _wants_scheduler(self) -> bool:
        return not self._done and not self.state.complete

    def _register_request(self) -> TaskRequest:
        """Registering again while reading the origin: say so, or the scheduler triggers a seed for it."""
        request = self.request
        if self.terms.origin_allowed and request.disable_back_to_source:
            request = dataclasses.replace(request, disable_back_to_source=False)
        if self._back_to_source is not None:
            return dataclasses.replace(request, need_back_to_source=True)
        return request

    async def _restore(self) -> None:
        """After registering again: what the scheduler needs to use this peer as a parent again (nothing
        of a held copy not yet confirmed: its origin read announces itself once it has the stat)."""
        if self._started_sent:
            await self.stream.send(started=pb.PeerStarted())
        if not self.file.ready.is_set():
            return
        if self._back_to_source is not None and self.state.layout is not None:
            await self.stream.back_to_source_started(self.state.layout, self.state.response_headers)
        held = [
            pb.PieceDone(number=n, digest=digest, parent_id="")
            for n in self.state.available_pieces()
            if (digest := self.state.piece_digest(n)) is not None
        ]
        await self.stream.resend_held(held)

    def _check_orphan(self, now: float) -> None:
        """Scheduler gone and no parent holds a missing piece: the origin after no_parent_timeout_s."""
        busy = self.stream.alive or self._back_to_source is not None or self.state.complete
        if busy or not self.parents.helpless():
            self._orphan_since = None
        elif self._orphan_since is None:
            self._orphan_since = now
        elif now - self._orphan_since >= (limit := self.ctx.config.download.no_parent_timeout_s):
            self._go_back_to_source(None, f"no scheduler, and no parent had a missing piece for {limit:g} s")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> bool:
        """A helper task owned by this attempt's TaskGroup, cancelled when the attempt ends. False (the
        coroutine closed unrun) once the attempt is ending: a piece that arrives while the daemon stops
        logged a 'TaskGroup is shutting down' traceback and a never-awaited coroutine."""
        try:
            task = self.tg.create_task(coro)
        except RuntimeError:  # the TaskGroup is shutting down or done
            coro.close()
            return False
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)
        return True

    # -- pieces -----------------------------------------------------------------------------------
    async def store_piece(
        self, number: int, data: memoryview, digest: int, source: str, parent_id: str, cost_s: float = 0.0
    ) -> None:
        """Write a verified piece, then make it available and queue its report."""
        if self.state.has(number):
            return
        if self._back_to_source is not None and source != "back_to_source":
            return  # once this peer reads the origin, only the origin's bytes are kept (it may have changed)
        assert self.state.layout is not None
        offset, length = self.state.layout.piece_range(number)
        version = self.state.version(number)
        # Storage does not return, even when cancelled, while its thread still reads `data`.
        await self.ctx.storage.write_piece(self.state.task_id, number, offset, data[:length], digest)
        # Not this copy if its version was forgotten meanwhile, or this peer began to read the origin
        # (the object may have changed there; the origin read writes this piece again, record included).
        if self.state.version(number) != version or (self._back_to_source and source != "back_to_source"):
            return
        if self.state.mark_available(number, digest):
            self.ctx.counters.downloaded(source, length)
            cost_ms = min(math.ceil(cost_s * 1000), 0xFFFFFFFF)  # > 0 whenever measured
            done = pb.PieceDone(number=number, digest=digest, parent_id=parent_id, cost_ms=cost_ms)
            self.stream.queue_piece(done)
            self.events.put_nowait(_Wake())

    async def _complete(self, now: float) -> None:
        """All pieces are available: report, ask for the digest verdict; durability follows on its own."""
        self.file.finish(now)
        await self.stream.flush_pieces(now)
        if not self.stream.alive:
            self._done = True
            return
        self._verdict_deadline = now + VERDICT_TIMEOUT_S
        await self.stream.send(finished=pb.PeerFinished(piece_digests=self.state.digests_in_order()))
        if not self.stream.alive:
            self._done = True

    # -- back to source ---------------------------------------------------------------------------
    def _go_back_to_source(self, layout: Layout | None, why: str) -> None:
        """Read the missing pieces from the origin; for a held copy that is complete, only its stat, which
        confirms the copy (task_file.py) or replaces it."""
        if self._back_to_source is not None or (self.state.complete and self.file.ready.is_set()):
            return
        if not self.terms.origin_allowed:
            if self.state.complete:  # nothing can confirm this held copy: it is taken as it is
                self.file.ready.set()
                return
            raise NoParents(f"no parent could serve the task and back-to-source is disabled ({why})")
        log.info("task %s goes back to source: %s", self.state.task_id[:12], why)
        self._schedule_deadline = None
        self.parents.close_all()
        self._back_to_source = self.tg.create_task(BackToSource(self, layout).run())
