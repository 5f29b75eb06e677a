"""Reading stored pieces back against their recorded CRC-32s, where the bytes on disk may have changed.

Two occasions: once for each task held from an earlier run of the daemon, before its first local use
(dfget, the proxy) or before a seed trigger resumes it while it is partial, since a byte may have
changed while the daemon was stopped (a failing disk, a stray write); and for one piece a child reports
failing its CRC-32 (piece protocol ERROR `corrupt_piece`).

Rules:
- A piece whose bytes no longer match is forgotten (its storage record too) and fetched again by the
  next download of the task; if the task was complete, the schedulers are told this host no longer
  holds it (so it is offered as nobody's parent for it). A running download from parents takes it back
  and fetches it again at once; an origin read, or an attempt awaiting its verdict, drops it when it
  ends. A task removed (or replaced) meanwhile is left alone.
- Reads run in one thread of their own (never the default executor's, which the origin reads and DNS
  share), on a dup of the task's fd, while the task is held (the GC leaves it); the daemon's stop ends
  them between two pieces. Requests that come while a task is read back wait for that same check.
- A reported piece is read back at most once until it is fetched again (a child that keeps reporting
  cannot make the daemon read the task more than once), and not while the whole task is read back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dfly.common.errors import StorageError
from dfly.daemon.conductor import PiecesLost
from dfly.daemon.context import DaemonContext
from dfly.daemon.live_task import LiveTask
from dfly.daemon.storage.verify import corrupt_pieces

log = logging.getLogger(__name__)

T = TypeVar("T")
Spawn = Callable[[Coroutine[Any, Any, T]], asyncio.Task[T]]
_READ_BACK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-back")


class StoredCheck:
    def __init__(self, ctx: DaemonContext, spawn: Spawn[Any], is_current: Callable[[LiveTask], bool]) -> None:
        self.ctx = ctx
        self._spawn = spawn
        self._is_current = is_current

    async def before_first_use(self, live: LiveTask) -> None:
        """Read a task held from an earlier run back (once) and forget the pieces that changed."""
        if live.check is None:
            live.check = self._spawn(self._read_back(live, None))
        bad = await asyncio.shield(live.check)
        if not live.unchecked:
            return  # an earlier waiter applied it
        live.unchecked = False
        if bad:
            self._forget(live, bad, "changed on disk since they were written")

    def reported(self, live: LiveTask, number: int) -> None:
        """A child got piece `number` failing its CRC-32 from this daemon: read the stored copy back."""
        if number in live.rechecked or not live.state.has(number):
            return
        if live.check is not None and not live.check.done():
            return  # the whole task is being read back now
        live.rechecked.add(number)
        self._spawn(self._apply_reported(live, number))

    async def _apply_reported(self, live: LiveTask, number: int) -> None:
        bad = await self._read_back(live, number)
        if bad:
            self._forget(live, bad, "fail their CRC-32 on disk (a child reported one)")

    def _forget(self, live: LiveTask, bad: list[int], why: str) -> None:
        state = live.state
        if not self._is_current(live):
            return  # removed (GC, eviction) or replaced meanwhile: its records are not these any more
        if live.running and live.attempt is not None:
            conductor = live.conductor
            if conductor is None or not conductor.may_refetch():
                # An origin read or an attempt awaiting its verdict cannot take pieces back: once it
                # ends they are dropped (and fetched by the task's next download).
                log.warning("task %s: %d stored pieces %s; dropped when its download ends",
                            state.task_id[:12], len(bad), why)  # fmt: skip
                live.attempt.add_done_callback(functools.partial(self._after_attempt, live, bad, why))
                return
            log.warning("task %s: %d stored pieces %s; fetching them again", state.task_id[:12],
                        len(bad), why)  # fmt: skip
            live.rechecked.difference_update(bad)  # their next copies may be reported (and read) again
            state.forget_pieces(bad)
            conductor.events.put_nowait(PiecesLost(bad, synced=True))
            return
        was_complete = state.complete
        log.warning(
            "task %s: %d of its %d stored pieces %s; fetching them again",
            state.task_id[:12],
            len(bad),
            state.available_count,
            why,
        )
        live.rechecked.difference_update(bad)
        state.forget_pieces(bad)  # their storage records too
        if was_complete and self.ctx.scheduler is not None:  # this host no longer holds it whole
            self._spawn(self.ctx.scheduler.delete_task(state.task_id))

    def _after_attempt(self, live: LiveTask, bad: list[int], why: str, attempt: asyncio.Task[None]) -> None:
        if not attempt.cancelled():  # cancelled: the daemon stops, and reads the task back after its start
            self._forget(live, bad, why)

    async def _read_back(self, live: LiveTask, only: int | None) -> list[int]:
        """The pieces (all available ones, or only `only`) whose bytes on disk differ from their digest."""
        state = live.state
        assert state.layout is not None
        layout = state.layout
        numbers = state.available_pieces() if only is None else [only]
        pieces = [(n, d) for n in numbers if (d := state.piece_digest(n)) is not None]
        try:
            fd = os.dup(self.ctx.storage.read_fd(state.task_id))
        except (StorageError, OSError):
            return []  # the file is gone: a local use finds that and downloads it again
        stop = threading.Event()

        def read() -> list[int]:
            try:
                return corrupt_pieces(fd, layout.content_length, layout.piece_length, pieces, stop.is_set)
            except OSError as exc:  # the disk cannot give them back: none of them is trusted
                log.warning("task %s: cannot read its file back (%s)", state.task_id[:12], exc)
                return [n for n, _ in pieces]
            finally:
                os.close(fd)

        release = live.usage.hold()
        try:
            return await asyncio.get_running_loop().run_in_executor(_READ_BACK, read)
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            release()
