"""Back-to-source for one download: stat the origin, fix the layout, stream pieces into storage.

The blocking HTTP client (`source.http`) runs in a daemon thread of its own (common/own_thread.py: not
the default executor, which short work shares); each piece it cuts is handed to the event loop and
written by the storage writer thread while the next piece is read into a second buffer slot; a slot is
reused only once its write is done, so memory stays at two pieces per download. A stop or a failure
halts the read at once (SourceInterrupt: a blocked connect, read or name lookup ends), and the buffer
goes back to the daemon's pool only after the last piece write stopped reading it.

Rules:
- The first back-to-source peer of a task fixes its layout: the user's piece length or the default
  rule; a later one adopts the layout the scheduler sent and checks the origin's length against it.
- The origin's refusal (status, headers) is reported to the scheduler, which tells every peer.
- Reading starts at the first missing piece; pieces already held are skipped, not rewritten, unless
  the origin's validators (ETag, else Last-Modified) differ from those recorded for the task: then the
  held pieces are of another version, are dropped (their records too), and the whole object is read
  again: never a file mixing two versions. The task's record takes the new validators after the old
  pieces' records are gone, so a restart resumes the new object instead of reading it all again.
- A held copy of another length is dropped before any byte of it is told (task_file.py); once this
  attempt confirmed its copy, another length is a StaleCopy error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dfly.common.errors import SourceError, SourceRefused
from dfly.common.own_thread import in_own_thread
from dfly.common.pieces import default_piece_length
from dfly.daemon.core.first_pass import FirstPassGate, hold_s
from dfly.daemon.core.task_state import Layout
from dfly.daemon.proxy.forward import hop_guard
from dfly.daemon.source import http
from dfly.daemon.task_file import stale_copy

if TYPE_CHECKING:
    from dfly.daemon.conductor import Conductor

log = logging.getLogger(__name__)
T = TypeVar("T")

STAT_TIMEOUT_S = 30.0
# Read ahead of the pieces being written, so a busy event loop does not stall the origin stream between
# pieces: up to READ_AHEAD_BYTES, at most 1/READ_AHEAD_SHARE of the daemon's buffer budget (concurrent
# origin reads of a seed and the children's receive buffers share it), and never more than is left to
# read. Pieces larger than that share get MIN_BUFFER_SLOTS slots while those take at most half the
# budget, else one (16 MiB pieces, the default from 4 GiB, took the whole 32 MiB before).
MIN_BUFFER_SLOTS = 2
READ_AHEAD_BYTES = 8 * 1024 * 1024
READ_AHEAD_SHARE = 8
READ_TIMEOUT_S = 60.0


def read_buffer_bytes(budget_bytes: int, layout: Layout, *, first_piece: int) -> int:
    """The origin read's buffer: piece-sized slots (see READ_AHEAD_BYTES), no larger than what is left."""
    piece = layout.piece_length
    slots = max(1, min(READ_AHEAD_BYTES, budget_bytes // READ_AHEAD_SHARE) // piece)
    if slots < MIN_BUFFER_SLOTS and MIN_BUFFER_SLOTS * piece <= budget_bytes // 2:
        slots = MIN_BUFFER_SLOTS
    left = layout.content_length - first_piece * piece
    return max(1, min(slots * piece, left))


class StoreHandoff:
    """A piece being written by the event loop; the reader thread waits on it before reusing the slot."""

    def __init__(self, future: concurrent.futures.Future[None], stop: threading.Event) -> None:
        self._future = future
        self._stop = stop

    def result(self) -> None:
        while True:  # wait for the write, but never outlive a stopped download
            try:
                self._future.result(timeout=0.5)
                return
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    self._future.cancel()
                    return


def first_pass_gate(piece_count: int, max_hold_s: float, task_id: str) -> FirstPassGate:
    """The source's first-pass gate, released after its hold (on this loop): `hold_s(...)` of the time
    the first pass took, so a short download is not held for long."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    gate: FirstPassGate

    def given_out() -> None:
        hold = hold_s(loop.time() - started, max_hold_s)
        log.info("task %s: first pass done, all pieces given out; release in %.2f s", task_id[:12], hold)
        if hold > 0:
            loop.call_later(hold, gate.release)
        else:
            gate.release()

    gate = FirstPassGate(piece_count, on_given_out=given_out)
    return gate


class BackToSource:
    def __init__(self, conductor: Conductor, layout: Layout | None) -> None:
        self.c = conductor
        self.layout_hint = layout
        self._stop = threading.Event()
        self._interrupt = http.SourceInterrupt()  # ends a blocked connect or read at once
        self._storing: set[asyncio.Task[None]] = set()  # piece writes that may still read the buffer

    def _halt(self) -> None:
        """Stop the origin read: between reads, and now if a connect or read is blocked."""
        self._stop.set()
        self._interrupt.interrupt()

    async def run(self) -> None:
        try:
            await self._run()
        except SourceError as exc:
            # Said here too: on a seed, the peers that asked see the error, but this host's setup (trust
            # store, DNS, routes) is what to look at.
            log.warning("task %s: reading the origin failed: %s", self.c.state.task_id[:12], exc)
            if isinstance(exc, SourceRefused) and self.c.request.for_swarm:
                raise  # this seed's own guard, not the origin: the scheduler lets the requester read it
            await self.c.stream.source_error(exc)
            raise
        finally:
            self._halt()

    async def _run(self) -> None:
        request = self.c.request
        seeding = request.for_swarm and not self.c.ctx.config.seed_peer.loopback_origins
        guard = hop_guard(request.allowed_origins, refuse_loopback=seeding)
        stat = await in_own_thread(
            "origin-stat", http.stat, request.url, request.headers, timeout_s=STAT_TIMEOUT_S,
            allowed_hosts=guard, interrupt=self._interrupt,
        )  # fmt: skip
        fresh = Layout(stat.content_length, request.piece_length or default_piece_length(stat.content_length))
        hint = self.layout_hint or self.c.state.layout
        if hint is not None and hint.content_length != stat.content_length:
            if self.layout_hint is not None:
                raise SourceError(
                    f"origin length {stat.content_length} differs from the task's {hint.content_length}"
                )
            if self.c.file.ready.is_set():  # this attempt's own copy: the object changed while it ran
                raise stale_copy(hint, fresh)
            await self.c.file.drop_held(fresh)  # a copy held from before: not told to anyone yet
            hint = None
        layout = hint or fresh
        if self.c.ctx.config.upload.first_pass and self.c.state.first_pass is None:
            upload = self.c.ctx.config.upload
            self.c.state.first_pass = first_pass_gate(
                layout.piece_count, upload.first_pass_hold_s, self.c.state.task_id
            )
        if not http.same_object(self.c.state.response_headers, stat):
            self.c.file.replace_object(stat.headers, "the origin's object changed since")
        await self.c.file.ensure(layout, stat.headers)
        await self.c.stream.back_to_source_started(layout, stat.headers)
        missing = [n for n in range(layout.piece_count) if not self.c.state.has(n)]
        if not missing:
            return
        loop = asyncio.get_running_loop()

        def on_piece(number: int, view: memoryview, digest: int) -> StoreHandoff | None:
            if self.c.state.has(number):
                return None
            store = self._store(number, view, digest)
            return StoreHandoff(asyncio.run_coroutine_threadsafe(store, loop), self._stop)

        # From the daemon's pool: a fresh bytearray per task cost ~0.2 s of page faults per GiB.
        buffer = await self.c.ctx.pool.acquire(
            read_buffer_bytes(self.c.ctx.pool.budget_bytes, layout, first_piece=missing[0])
        )
        reader = in_own_thread(
            "origin-read",
            http.read_pieces,
            stat,
            request.headers,
            piece_length=layout.piece_length,
            first_piece=missing[0],
            buffer=buffer,
            on_piece=on_piece,
            should_stop=self._stop.is_set,
            timeout_s=READ_TIMEOUT_S,
            piece_timeout_s=self.c.ctx.config.download.piece_timeout_s,
            allowed_hosts=guard,
            interrupt=self._interrupt,
        )
        # released one loop turn later, after the pieces the thread handed over last have started
        await await_thread_holding(reader, self._halt, functools.partial(self._release_soon, loop, buffer))

    async def _store(self, number: int, view: memoryview, digest: int) -> None:
        """Store one piece from the read's buffer (a task of this loop, tracked while it may read it)."""
        task = asyncio.current_task()
        assert task is not None
        self._storing.add(task)
        task.add_done_callback(self._store_ended)
        await self.c.store_piece(number, view, digest, "back_to_source", "")

    def _store_ended(self, task: asyncio.Task[None]) -> None:
        self._storing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a halted read's handoff no longer waits for it (StoreHandoff)

    def _release_soon(self, loop: asyncio.AbstractEventLoop, buffer: bytearray) -> None:
        loop.call_soon(self._release_when_written, buffer)

    def _release_when_written(self, buffer: bytearray) -> None:
        """The buffer goes back to the pool once no piece write reads from it: a halted read returns while
        its last write, abandoned by StoreHandoff, may still be copying from the buffer (storage waits
        for its writer thread before such a write ends, cancelled or not)."""
        pool = self.c.ctx.pool
        writing = set(self._storing)
        if not writing:
            pool.release(buffer)
            return
        left = len(writing)

        def one_ended(_task: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                pool.release(buffer)

        for task in writing:
            task.add_done_callback(one_ended)


async def await_thread_holding(
    thread: asyncio.Future[T], stop: Callable[[], None], release: Callable[[], None]
) -> T:
    """Await a worker thread that fills a borrowed buffer (its result), then `release` the buffer once.

    Cancelled, it asks the thread to `stop` and waits for it (the thread still writes into the buffer
    until it returns). Cancelled again while waiting, it leaves at once and the buffer goes back when
    the thread ends: never into the pool while the thread uses it, never lost from the pool's budget.
    """
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        stop()
        await asyncio.wait([thread])
        raise
    finally:
        if thread.done():
            _release_after(release, thread)
        else:
            thread.add_done_callback(functools.partial(_release_after, release))


def _release_after(release: Callable[[], None], thread: asyncio.Future[Any]) -> None:
    if not thread.cancelled():
        thread.exception()  # retrieved: after a cancel nobody awaits it (else asyncio logs it at exit)
    release()
