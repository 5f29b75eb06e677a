"""A task while the daemon holds it: its state, its running attempt and its users (`LiveTask`, `Usage`),
and the view of it the piece server is given (`ServedTaskView`).

Rules:
- `Usage` is shared by the LiveTasks that replace one another for one task id (a failed attempt's
  successor), so users and `last_used` (wall clock) carry over; `hold()` marks the task in use until
  its release is called, once, however often.
- A task is in use while an attempt runs or anybody holds it; the storage GC removes only tasks not
  in use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dfly.daemon.conductor import Conductor
from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.core.task_state import TaskState


@dataclass
class Usage:
    """Who reads a task and when it was last used; shared by the LiveTasks that replace one another."""

    last_used: float = field(default_factory=time.time)
    users: int = 0  # local downloads reading it and child connections to it

    def hold(self) -> Callable[[], None]:
        """Mark the task in use until the returned callable is called (idempotent)."""
        self.users += 1
        self.last_used = time.time()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.users -= 1
                self.last_used = time.time()

        return release


@dataclass
class LiveTask:
    state: TaskState
    file_ready: asyncio.Event = field(default_factory=asyncio.Event)
    attempt: asyncio.Task[None] | None = None
    conductor: Conductor | None = None  # of the running attempt
    usage: Usage = field(default_factory=Usage)
    # Held from an earlier run of the daemon and not yet read back: its bytes are checked against their
    # digests before the first local use (stored_check.py).
    unchecked: bool = False
    check: asyncio.Task[list[int]] | None = None  # its whole read-back, once (stored_check.py)
    rechecked: set[int] = field(default_factory=set)  # pieces read back on a child's corrupt report

    @property
    def running(self) -> bool:
        return self.attempt is not None and not self.attempt.done()

    @property
    def in_use(self) -> bool:
        return self.running or self.usage.users > 0


class ServedTaskView:
    """A live task as the piece server sees it (transfer.server.ServedTask)."""

    def __init__(
        self,
        live: LiveTask,
        read_fd: Callable[[], int],
        report_corrupt: Callable[[int], None],
        is_current: Callable[[], bool],
    ) -> None:
        self._live = live
        self._read_fd = read_fd
        self._is_current = is_current
        self.report_corrupt = report_corrupt
        layout = live.state.layout
        assert layout is not None
        self.task_id = live.state.task_id
        self.piece_length = layout.piece_length
        self.content_length = layout.content_length

    @property
    def piece_count(self) -> int:
        return self._live.state.piece_count

    def available_pieces(self) -> Iterable[int]:
        return self._live.state.available_pieces()

    def piece_digest(self, number: int) -> int | None:
        """None once another attempt replaced this one: the task file may hold other bytes by now (a held
        copy of another layout dropped and made anew), while this view's state still lists its pieces."""
        return self._live.state.piece_digest(number) if self._is_current() else None

    def read_fd(self) -> int:
        return self._read_fd()

    def subscribe(self, on_available: Callable[[int], None]) -> Callable[[], None]:
        return self._live.state.subscribe(on_available)

    @property
    def first_pass(self) -> FirstPassGate | None:
        return self._live.state.first_pass

    def peer_has(self, peer_id: str, number: int) -> bool:
        parent_has = self._live.state.parent_has
        return parent_has is not None and parent_has(peer_id, number)

    def hold(self) -> Callable[[], None]:
        return self._live.usage.hold()
