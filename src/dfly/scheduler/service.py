"""The scheduler's gRPC adapter (grpc.aio): proto messages → engine events, engine commands → stream
writes and seed-peer DownloadTask calls.

Rules:
- the engine is called only from the event loop thread, with `now = loop.time()`; ONE timer, re-armed
  from `engine.next_deadline()` after every call (loop.call_at);
- each AnnouncePeer stream has one asyncio.Queue; commands for the peer are put there (peer_streams.py)
  and the handler writes them in order; a stream that ends before the peer finished or failed is a PeerLeft;
- a HostKeepAlive stream that ends (the last one of the host) is a HostDisconnected; a keepalive of a
  host the engine no longer knows ends its stream (FAILED_PRECONDITION), and the daemon announces again;
- every task it starts (stream readers, seed triggers) is tracked and cancelled by `stop()`;
- seed triggers and their channels live in seed_triggers.py; the channels are pruned after every host
  event and timer, so they follow the connected seeds;
- errors are converted here: bad requests get INVALID_ARGUMENT / FAILED_PRECONDITION / NOT_FOUND with a
  one-line message, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
from grpc import aio

from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc
from dfly.common.errors import DflyError, UsageError
from dfly.common.net import host_port
from dfly.scheduler import convert
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.core.messages import (
    Command,
    Event,
    HostAnnounced,
    HostDisconnected,
    HostKeepAlive,
    HostLeft,
    PeerLeft,
    PeerRegistered,
    TaskDeleted,
    TriggerSeedPeer,
)
from dfly.scheduler.metrics import SchedulerMetrics
from dfly.scheduler.peer_streams import EndStream, PeerStream
from dfly.scheduler.seed_triggers import ChannelFactory, SeedTriggers

log = logging.getLogger(__name__)

SEED_EVENTS = (HostAnnounced, HostDisconnected, HostLeft)  # events that may end or move a seed


REGISTER_TIMEOUT_S = 30.0  # an AnnouncePeer stream's first message (register) must come within this


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        engine: SchedulerEngine,
        metrics: SchedulerMetrics | None = None,
        *,
        seed_trigger_timeout_s: float = 10.0,
        channel_factory: ChannelFactory = aio.insecure_channel,
        keepalive_wait_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._keepalive_wait_s = keepalive_wait_s
        self._metrics = metrics if metrics is not None else SchedulerMetrics()
        self._metrics.track_sizes(
            lambda: len(engine.cluster.hosts),
            lambda: len(engine.cluster.tasks),
            # list() copies under the GIL: the metrics thread never iterates a dict the loop changes
            lambda: sum(1 for host in list(engine.cluster.hosts.values()) if not host.disconnected),
        )
        self._seeds = SeedTriggers(channel_factory, self._seed_address, seed_trigger_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, PeerStream] = {}
        self._keepalive_streams: dict[str, int] = {}
        self._keepalive_handlers: set[asyncio.Task[Any]] = set()  # ended by stop(), not by gRPC's cancel
        self._awaiting_keepalive: dict[str, asyncio.TimerHandle] = {}  # announced, no keepalive stream yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for handle in self._awaiting_keepalive.values():
            handle.cancel()
        self._awaiting_keepalive.clear()
        for stream in list(self._streams.values()):
            stream.end(grpc.StatusCode.UNAVAILABLE, "scheduler is stopping")
        for handler in list(self._keepalive_handlers):  # each ends its stream with UNAVAILABLE
            handler.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._seeds.close()

    # --- RPCs -----------------------------------------------------------------------------------------

    async def AnnounceHost(self, request: pb.AnnounceHostRequest, context: Any) -> pb.Empty:
        host = request.host
        if not host.host_id or not host.ip:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host_id and ip are required")
        self._apply(convert.host_announced(request))
        if host.host_id not in self._keepalive_streams and self._loop is not None:
            if (earlier := self._awaiting_keepalive.pop(host.host_id, None)) is not None:
                earlier.cancel()
            self._awaiting_keepalive[host.host_id] = self._loop.call_later(
                self._keepalive_wait_s, self._no_keepalive, host.host_id, host.boot_id
            )
        return pb.Empty()

    def _no_keepalive(self, host_id: str, boot_id: str) -> None:
        """A host announced but never opened its keepalive stream (a daemon does at once): it is not
        offered as a parent, and it is forgotten after host_ttl_s like any host gone. Else an announce
        alone would keep its host, its tasks and their digests here for good."""
        self._awaiting_keepalive.pop(host_id, None)
        if not self._stopping and host_id not in self._keepalive_streams and self._engine.has_host(host_id):
            log.warning("host %s announced but opened no keepalive stream; treated as gone", host_id)
            self._apply(HostDisconnected(host_id, boot_id))

    async def LeaveHost(self, request: pb.LeaveHostRequest, context: Any) -> pb.Empty:
        self._apply(HostLeft(request.host_id))
        return pb.Empty()

    async def DeleteTask(self, request: pb.DeleteTaskRequest, context: Any) -> pb.Empty:
        if not request.host_id or not request.task_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host_id and task_id are required")
        self._apply(TaskDeleted(request.host_id, request.task_id))
        return pb.Empty()

    async def StatTask(self, request: pb.StatTaskRequest, context: Any) -> pb.TaskStat:
        view = self._engine.stat_task(request.task_id)
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} is unknown")
        assert view is not None
        return convert.task_stat(view)

    async def HostKeepAlive(self, request_iterator: Any, context: Any) -> pb.Empty:
        host_id = ""
        boot_id = ""
        if self._stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is stopping")
        handler = asyncio.current_task()
        assert handler is not None
        self._keepalive_handlers.add(handler)
        try:
            async for request in request_iterator:
                if not host_id:
                    if not self._engine.has_host(request.host_id):
                        await context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION, f"host {request.host_id!r} has not announced"
                        )
                    host_id, boot_id = request.host_id, request.boot_id
                    self._keepalive_streams[host_id] = self._keepalive_streams.get(host_id, 0) + 1
                    if (awaiting := self._awaiting_keepalive.pop(host_id, None)) is not None:
                        awaiting.cancel()
                elif request.host_id != host_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host_id changed on the stream")
                elif not self._engine.has_host(host_id):
                    # Forgotten while its stream stayed up (a LeaveHost with its id, e.g. from a second
                    # daemon with the same host id): end the stream, so the daemon announces again.
                    forgotten = f"host {host_id!r} is no longer known; announce again"
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, forgotten)
                event = HostKeepAlive(
                    host_id, request.boot_id, request.upload_rate_bytes_per_s, request.upload_slots_in_use
                )
                self._apply(event)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Ended by stop(): a clear status for the daemon, not gRPC's traceback for a cancelled handler
            # (none if the handler was already ending the stream with a status of its own).
            with contextlib.suppress(grpc.aio.UsageError):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is stopping")
        finally:
            self._keepalive_handlers.discard(handler)
            if host_id:
                remaining = self._keepalive_streams.get(host_id, 1) - 1
                if remaining > 0:
                    self._keepalive_streams[host_id] = remaining
                else:
                    self._keepalive_streams.pop(host_id, None)
                    if not self._stopping:
                        self._apply(HostDisconnected(host_id, boot_id))
        return pb.Empty()

    async def AnnouncePeer(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.AnnouncePeerResponse]:
        stream = PeerStream()
        reader = self._spawn(self._read_peer_requests(request_iterator, stream))
        self._metrics.peer_streams.inc()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, EndStream):
                    if item.code is not None:
                        await context.abort(item.code, item.details)
                    return
                yield item
        finally:
            reader.cancel()
            self._metrics.peer_streams.dec()
            self._forget(stream)

    # --- peer stream internals ------------------------------------------------------------------------

    async def _read_peer_requests(self, requests: Any, stream: PeerStream) -> None:
        iterator = aiter(requests)
        try:
            try:
                async with asyncio.timeout(REGISTER_TIMEOUT_S):
                    first = await anext(iterator, None)
            except TimeoutError:  # a stream that never registers holds nothing of the engine, but a slot
                stream.end(grpc.StatusCode.DEADLINE_EXCEEDED, f"no register within {REGISTER_TIMEOUT_S:g} s")
                return
            if first is not None:
                if self._on_peer_request(first, stream):
                    return
                async for request in iterator:
                    if self._on_peer_request(request, stream):
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-read; the stream just ends
            log.debug("announce stream of %s broke: %s", stream.peer_id, exc)
            stream.end()
            return
        if stream.awaiting_verdict:
            stream.close_after_verdict = True  # half-closed after `finished`: answer, then end
        else:
            stream.end()

    def _on_peer_request(self, request: pb.AnnouncePeerRequest, stream: PeerStream) -> bool:
        """Handle one request; True when the stream must end (the reason is already queued)."""
        kind = request.WhichOneof("request")
        if stream.peer_id is None:
            if kind != "register":
                stream.end(grpc.StatusCode.INVALID_ARGUMENT, f"first request must be register, not {kind}")
                return True
            if not (
                request.peer_id and request.host_id and request.task_id and request.register.download.url
            ):
                stream.end(
                    grpc.StatusCode.INVALID_ARGUMENT, "register needs host_id, task_id, peer_id and url"
                )
                return True
            if request.peer_id in self._streams:
                stream.end(grpc.StatusCode.ALREADY_EXISTS, f"peer {request.peer_id} already has a stream")
                return True
            try:
                download = convert.download_spec(request.register.download)
            except UsageError as exc:
                stream.end(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                return True
            stream.peer_id = request.peer_id
            self._streams[request.peer_id] = stream
            self._apply(PeerRegistered(request.peer_id, request.host_id, request.task_id, download))
            return False
        if request.peer_id and request.peer_id != stream.peer_id:
            stream.end(grpc.StatusCode.INVALID_ARGUMENT, "peer_id changed on the stream")
            return True
        try:
            event = convert.peer_event(request, stream.peer_id)
        except UsageError as exc:
            stream.end(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return True
        if event is None:
            stream.end(
                grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} request after register"
            )
            return True
        if kind == "finished":
            stream.awaiting_verdict = True
        if kind == "failed":
            stream.ended = True
        self._apply(event)
        if kind == "failed":
            stream.end()
            return True
        return False

    def _forget(self, stream: PeerStream) -> None:
        if stream.peer_id is None or self._streams.get(stream.peer_id) is not stream:
            return
        del self._streams[stream.peer_id]
        if not stream.ended and not self._stopping:
            self._apply(PeerLeft(stream.peer_id))

    # --- engine calls and commands --------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None, "SchedulerService.start() was not awaited"
        return self._loop.time()

    def _apply(self, event: Event) -> None:
        self._metrics.observe_event(event)
        try:
            commands = self._engine.handle(event, self._now())
        except DflyError as exc:
            log.error("engine refused %s: %s", type(event).__name__, exc)
            commands = []
        except Exception:  # a bug in the engine must not take the scheduler down
            log.exception("engine failed on %s", type(event).__name__)
            commands = []
        if isinstance(event, SEED_EVENTS):
            self._seeds.prune()
        self._carry_out(commands)

    def _on_timer(self) -> None:
        fired_at = self._timer_at
        self._timer = None
        self._timer_at = None
        now = max(self._now(), fired_at or 0.0)
        try:
            commands = self._engine.on_timer(now)
        except Exception:
            log.exception("engine timer failed")
            commands = []
        self._seeds.prune()  # the sweep may have disconnected or forgotten seeds
        self._carry_out(commands)

    def _carry_out(self, commands: list[Command]) -> None:
        for command in commands:
            self._metrics.observe_command(command)
            if isinstance(command, TriggerSeedPeer):
                self._spawn(self._trigger_seed(command))
            else:
                self._send_to_peer(command)
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        deadline = self._engine.next_deadline()
        if deadline == self._timer_at or self._stopping:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, deadline
        if deadline is not None:
            assert self._loop is not None
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _send_to_peer(self, command: Command) -> None:
        if isinstance(command, TriggerSeedPeer):
            return
        stream = self._streams.get(command.peer_id)
        if stream is None:
            log.debug("no stream for %s, dropped", command)
            return
        stream.deliver(command)

    async def _trigger_seed(self, command: TriggerSeedPeer) -> None:
        failure = await self._seeds.trigger(command)
        if failure is not None and not self._stopping:
            self._apply(failure)

    def _seed_address(self, host_id: str) -> str | None:
        endpoint = self._engine.seed_control_endpoint(host_id)
        return host_port(*endpoint) if endpoint is not None else None

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
