"""Reading stored pieces back against their recorded CRC-32s, where the bytes on disk may have changed.

Two occasions: once for each task held from an earlier run of the daemon, before its first local use
(dfget, the proxy), since a byte may have changed while the daemon was stopped (a failing disk, a stray
write); and for one piece a child reports failing its CRC-32 (piece protocol ERROR `corrupt_piece`).

Rules:
- A piece whose bytes no longer match is forgotten (its storage record too) and fetched again by the
  next download of the task; if the task was complete, the schedulers are told this host no longer
  holds it (so it is offered as nobody's parent for it). A running download from parents takes it back
  and fetches it again at once; an origin read, or an attempt awaiting its verdict, drops it when it
  ends. Every start of a task held from an earlier run (a local use, a seed trigger) waits for the
  task's read-back, so no download resumes on pieces nobody checked.
- Reads run in a worker thread on a dup of the task's fd. Requests that come while a task is read back
  wait for that same check. A reported piece is read at most once per run of the daemon (a child that
  keeps reporting cannot make the daemon read the task more than once), and not while the whole task
  is read back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from dfly.common.errors import StorageError
from dfly.daemon.conductor import PiecesLost
from dfly.daemon.context import DaemonContext
from dfly.daemon.live_task import LiveTask
from dfly.daemon.storage.verify import corrupt_pieces

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]


class StoredCheck:
    def __init__(self, ctx: DaemonContext, spawn: Spawn) -> None:
        self.ctx = ctx
        self._spawn = spawn

    async def before_first_use(self, live: LiveTask) -> None:
        """Read a task held from an earlier run back (once) and forget the pieces that changed."""
        if live.check is None:
            live.check = self._read_back(live, None)
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
        self._spawn(self._apply_reported(live, self._read_back(live, number)))

    async def _apply_reported(self, live: LiveTask, check: asyncio.Future[list[int]]) -> None:
        bad = await check
        if bad:
            self._forget(live, bad, "fail their CRC-32 on disk (a child reported one)")

    def _forget(self, live: LiveTask, bad: list[int], why: str) -> None:
        state = live.state
        live.rechecked.difference_update(bad)  # the next copy of each may be reported (and read) again
        if live.running and live.attempt is not None:
            conductor = live.conductor
            if conductor is not None and conductor.may_refetch():
                log.warning("task %s: %d stored pieces %s; fetching them again", state.task_id[:12],
                            len(bad), why)  # fmt: skip
                state.forget_pieces(bad)
                conductor.events.put_nowait(PiecesLost(bad))
                return
            # An origin read or a finished attempt awaiting its verdict cannot take pieces back: once it
            # ends, they are dropped (and fetched by the task's next download).
            log.warning("task %s: %d stored pieces %s; dropped when its download ends", state.task_id[:12],
                        len(bad), why)  # fmt: skip
            live.attempt.add_done_callback(functools.partial(self._after_attempt, live, bad, why))
            return
        was_complete = state.complete
        log.warning(
            "task %s: %d of its %d stored pieces %s; fetching them again",
            state.task_id[:12],
            len(bad),
            state.available_count,
            why,
        )
        state.forget_pieces(bad)  # their storage records too
        if was_complete and self.ctx.scheduler is not None:  # this host no longer holds it whole
            self._spawn(self.ctx.scheduler.delete_task(state.task_id))

    def _after_attempt(self, live: LiveTask, bad: list[int], why: str, attempt: asyncio.Task[None]) -> None:
        if not attempt.cancelled():  # cancelled: the daemon stops, and reads the task back after its start
            self._forget(live, bad, why)

    def _read_back(self, live: LiveTask, only: int | None) -> asyncio.Future[list[int]]:
        """The pieces (all available ones, or only `only`) whose bytes on disk differ from their digest."""
        state = live.state
        assert state.layout is not None
        layout = state.layout
        numbers = state.available_pieces() if only is None else [only]
        pieces = [(n, d) for n in numbers if (d := state.piece_digest(n)) is not None]

        def read(fd: int) -> list[int]:
            try:
                return corrupt_pieces(fd, layout.content_length, layout.piece_length, pieces)
            except OSError as exc:  # the disk cannot give them back: none of them is trusted
                log.warning("task %s: cannot read its file back (%s)", state.task_id[:12], exc)
                return [n for n, _ in pieces]
            finally:
                os.close(fd)

        try:
            fd = os.dup(self.ctx.storage.read_fd(state.task_id))
        except (StorageError, OSError):
            done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
            done.set_result([])  # the file is gone: a local use finds that and downloads it again
            return done
        return asyncio.ensure_future(asyncio.to_thread(read, fd))
