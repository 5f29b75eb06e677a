"""One download's AnnouncePeer stream to the scheduler: register, replies, writes, and re-registering.

Owned by a Conductor and used only from its loop.

Rules:
- `open()` registers; with no scheduler connected it waits for one only within REGISTER_WAIT_S of the
  last one going (then a channel that is down fails at once), so during an outage a new download
  reaches the origin without a wait. Replies are queued for the conductor as `SchedulerReply`, the end
  of a stream as `SchedulerGone` (for the current stream only: one from a stream already replaced is
  dropped). Writes while no stream is up are dropped; the conductor decides what a missing scheduler
  means.
- Streams go to the task's scheduler on the ring (scheduler_ring.py). After a break `reregister()`
  opens a new stream under the same peer id (to the next scheduler on the ring if that one is gone),
  each try once some scheduler is connected, backing off from 0.2 s, doubling, to at most 5 s between
  tries, until it succeeds or the download ends; the back-off carries over streams that break again
  within 5 s (a scheduler that takes the registration and drops it must not make us spin). Once
  registered it runs `restore`, which tells the scheduler what it needs to use this peer again (what
  it holds, whether it reads the origin); a stream that breaks during `restore` is tried again.
- Progress is batched: pieces queued with `queue_piece` go out together on `flush_pieces` (the
  conductor flushes the first batch at once, later ones at most once per progress_report_interval_s,
  and at completion); after registering again `resend_held` replaces the batch with everything held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import SourceError
from dfly.daemon.context import DaemonContext
from dfly.daemon.core.task_state import Layout
from dfly.daemon.task_request import TaskRequest

log = logging.getLogger(__name__)

REREGISTER_FIRST_S = 0.2
REREGISTER_MAX_S = 5.0
REGISTER_WAIT_S = 3.0  # a scheduler that takes no registration within this is not reachable


@dataclass(frozen=True)
class SchedulerReply:
    response: pb.AnnouncePeerResponse


@dataclass(frozen=True)
class SchedulerGone:
    reason: str
    generation: int


class PeerStream:
    def __init__(
        self,
        ctx: DaemonContext,
        task_id: str,
        peer_id: str,
        events: asyncio.Queue[object],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.ctx = ctx
        self.task_id = task_id
        self.peer_id = peer_id
        self.events = events
        self.spawn = spawn
        self.alive = False
        self.reregistering = False
        self._call: grpc.aio.StreamStreamCall[pb.AnnouncePeerRequest, pb.AnnouncePeerResponse] | None = None
        self._generation = 0
        self._opened_at = -math.inf  # loop time the last stream was opened
        self._delay_s = REREGISTER_FIRST_S  # kept across breaks; reset once a stream lived long enough
        self._write_lock = asyncio.Lock()
        self._pieces: list[pb.PieceDone] = []  # progress not yet sent
        self._flushed_at = -math.inf  # loop time of the last batch sent

    def is_current(self, gone: SchedulerGone) -> bool:
        return gone.generation == self._generation

    async def open(self, request: TaskRequest) -> bool:
        """Open a stream and register; True when the scheduler took the registration."""
        scheduler = self.ctx.scheduler
        if scheduler is None:
            return False
        self.close()
        self._generation += 1
        # No scheduler connected: wait for one only at the start of an outage (a restart, the host not
        # yet announced again), in all at most REGISTER_WAIT_S; later downloads go on at once.
        if (left_s := REGISTER_WAIT_S - scheduler.unhealthy_for_s()) > 0 and not scheduler.healthy():
            with contextlib.suppress(TimeoutError):
                await scheduler.wait_healthy(left_s)
        # With none connected, a channel that is down fails the stream at once instead of waiting.
        call = scheduler.pick(self.task_id).announce_peer(wait_for_ready=bool(scheduler.healthy()))
        register = self._message(register=pb.RegisterPeer(download=request.to_proto()))
        try:
            async with asyncio.timeout(REGISTER_WAIT_S), self._write_lock:
                await call.write(register)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
            call.cancel()
            if isinstance(exc, TimeoutError):
                reason = f"it took no registration within {REGISTER_WAIT_S:g} s (overloaded or unreachable)"
            elif isinstance(exc, grpc.aio.AioRpcError):
                reason = exc.code().name
            else:
                reason = type(exc).__name__
            log.warning("cannot register %s with the scheduler: %s", self.task_id[:12], reason)
            return False
        self._call = call
        self.alive = True
        self._opened_at = asyncio.get_running_loop().time()
        self.spawn(self._read_replies(call, self._generation))
        return True

    async def reregister(
        self,
        request: Callable[[], TaskRequest],
        restore: Callable[[], Awaitable[None]],
        wanted: Callable[[], bool],
    ) -> None:
        """Register again after a break (see the module rules); `wanted()` False stops trying."""
        scheduler = self.ctx.scheduler
        if scheduler is None or self.reregistering:
            return
        self.reregistering = True
        loop = asyncio.get_running_loop()
        if loop.time() - self._opened_at >= REREGISTER_MAX_S:  # the last stream lived: start afresh
            self._delay_s = REREGISTER_FIRST_S
        try:
            while wanted() and not self.alive:
                if self._opened_at > -math.inf:  # a stream that keeps breaking backs off too
                    await asyncio.sleep(self._delay_s)
                    self._delay_s = min(self._delay_s * 2, REREGISTER_MAX_S)
                await scheduler.wait_healthy()
                if await self.open(request()):
                    log.info("task %s registered with the scheduler again", self.task_id[:12])
                    await restore()  # if the stream breaks meanwhile, the loop goes on
        finally:
            self.reregistering = False

    async def _read_replies(
        self,
        call: grpc.aio.StreamStreamCall[pb.AnnouncePeerRequest, pb.AnnouncePeerResponse],
        generation: int,
    ) -> None:
        reason = "closed"
        try:
            async for response in call:
                await self.events.put(SchedulerReply(response))
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}".splitlines()[0]
        except asyncio.CancelledError:
            raise
        if generation == self._generation:
            self.alive = False
            await self.events.put(SchedulerGone(reason, generation))

    async def send(self, **oneof: object) -> None:
        call = self._call
        if call is None or not self.alive:
            return
        try:
            async with self._write_lock:
                await call.write(self._message(**oneof))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if call is self._call and self.alive:
                self.alive = False
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "stream closed"
                await self.events.put(SchedulerGone(reason, self._generation))

    def queue_piece(self, done: pb.PieceDone) -> None:
        self._pieces.append(done)

    def pieces_due(self, now: float, interval_s: float) -> bool:
        """Whether a batch may go now: the first at once, the next `interval_s` after the last one."""
        return now - self._flushed_at >= interval_s

    async def flush_pieces(self, now: float) -> None:
        """Send the queued progress, if any, as one PiecesFinished."""
        if self._pieces:
            self._flushed_at = now
            pieces, self._pieces = self._pieces, []
            await self.send(pieces_finished=pb.PiecesFinished(pieces=pieces))

    async def resend_held(self, held: list[pb.PieceDone]) -> None:
        """After registering again: the new stream hears of every piece held, the queued batch included."""
        self._pieces = []
        if held:
            await self.send(pieces_finished=pb.PiecesFinished(pieces=held))

    async def reschedule(self, report: pb.Reschedule) -> None:
        for parent_id in report.corrupt_parents:
            log.warning("task %s: reporting parent %s for a corrupt piece", self.task_id[:12], parent_id)
        await self.send(reschedule=report)

    async def back_to_source_started(self, layout: Layout, headers: dict[str, str]) -> None:
        await self.send(
            back_to_source_started=pb.BackToSourceStarted(
                content_length=layout.content_length,
                piece_length=layout.piece_length,
                response_headers=headers,
            )
        )

    async def source_error(self, error: SourceError) -> None:
        """The origin failed this peer's read: the scheduler fails the task with the origin's status."""
        await self.send(
            failed=pb.PeerFailed(
                description=error.message,
                back_to_source=True,
                source_error=pb.SourceError(
                    status_code=error.status_code, message=error.message, headers=error.headers
                ),
            )
        )

    def _message(self, **oneof: object) -> pb.AnnouncePeerRequest:
        return pb.AnnouncePeerRequest(
            host_id=self.ctx.host_id,
            task_id=self.task_id,
            peer_id=self.peer_id,
            **oneof,  # type: ignore[arg-type]
        )

    def close(self) -> None:
        """Cancel the current stream (its reader then ends quietly)."""
        call, self._call = self._call, None
        self.alive = False
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()
