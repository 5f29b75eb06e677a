"""StoredCheck on a real file: a task held from before a restart is read back whole before its first
local use, even when a child's corrupt report read one piece back first; a reported piece is read at
most once; changed pieces are forgotten, with their storage records."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dfly.common.digest import crc32
from dfly.daemon.conductor import PiecesLost
from dfly.daemon.core.task_state import TaskState
from dfly.daemon.live_task import LiveTask
from dfly.daemon.stored_check import StoredCheck

PIECE = 4096
PIECES = 4


class Held:
    """A task file on disk with its recorded digests, as the daemon loads it after a restart."""

    def __init__(self, tmp_path: Path) -> None:
        data = os.urandom(PIECE * PIECES)
        self.path = tmp_path / "task"
        self.path.write_bytes(data)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.forgotten: list[int] = []
        state = TaskState("t" * 64)
        state.set_layout(len(data), PIECE)
        state.load_pieces({n: crc32(data[n * PIECE : (n + 1) * PIECE]) for n in range(PIECES)})
        state.on_forget = lambda _task, numbers: self.forgotten.extend(numbers)
        self.live = LiveTask(state, unchecked=True)
        self.reads = 0
        self.current = True  # the task manager still holds this live task

    def flip(self, offset: int) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))

    def running(self, *, may_refetch: bool) -> tuple[asyncio.Future[None], asyncio.Queue[object]]:
        """A download attempt running on the task (to be ended by the test), and its conductor's queue."""
        attempt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        events: asyncio.Queue[object] = asyncio.Queue()
        self.live.attempt = attempt  # type: ignore[assignment]
        conductor = SimpleNamespace(may_refetch=lambda: may_refetch, events=events)
        self.live.conductor = conductor  # type: ignore[assignment]
        return attempt, events

    def checker(self, spawned: list[asyncio.Task[None]]) -> StoredCheck:
        def read_fd(_task_id: str) -> int:
            self.reads += 1
            return self.fd

        def spawn(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
            task = asyncio.ensure_future(coroutine)
            spawned.append(task)
            return task

        ctx: Any = SimpleNamespace(storage=SimpleNamespace(read_fd=read_fd), scheduler=None)
        return StoredCheck(ctx, spawn, lambda live: live is self.live and self.current)


def test_a_report_before_the_first_local_use_does_not_stand_for_the_whole_check(tmp_path: Path) -> None:
    held = Held(tmp_path)
    held.flip(PIECE + 1)  # piece 1
    held.flip(3 * PIECE + 2)  # piece 3

    async def main() -> None:
        spawned: list[asyncio.Task[None]] = []
        check = held.checker(spawned)
        check.reported(held.live, 1)
        await asyncio.gather(*spawned)
        assert held.forgotten == [1]
        await check.before_first_use(held.live)
        assert held.forgotten == [1, 3]
        assert not held.live.unchecked
        await check.before_first_use(held.live)  # once only
        assert held.reads == 2

    asyncio.run(main())
    os.close(held.fd)


def test_a_piece_is_read_back_once_however_often_it_is_reported(tmp_path: Path) -> None:
    held = Held(tmp_path)

    async def main() -> None:
        spawned: list[asyncio.Task[None]] = []
        check = held.checker(spawned)
        for _ in range(3):
            check.reported(held.live, 2)
            await asyncio.gather(*spawned)
        assert held.reads == 1
        assert held.forgotten == []
        assert held.live.state.complete

    asyncio.run(main())
    os.close(held.fd)


def test_a_running_download_from_parents_takes_a_reported_piece_back_at_once(tmp_path: Path) -> None:
    held = Held(tmp_path)
    held.live.unchecked = False
    held.flip(2 * PIECE)

    async def main() -> None:
        spawned: list[asyncio.Task[None]] = []
        check = held.checker(spawned)
        attempt, events = held.running(may_refetch=True)
        check.reported(held.live, 2)
        await asyncio.gather(*spawned)
        assert held.forgotten == [2]
        lost = events.get_nowait()
        assert isinstance(lost, PiecesLost)
        assert (lost.pieces, lost.synced) == ([2], True)
        assert 2 not in held.live.rechecked  # its next copy may be reported again
        attempt.set_result(None)

    asyncio.run(main())
    os.close(held.fd)


def test_an_origin_read_drops_a_reported_piece_when_it_ends(tmp_path: Path) -> None:
    held = Held(tmp_path)
    held.live.unchecked = False
    held.flip(2 * PIECE)

    async def main() -> None:
        spawned: list[asyncio.Task[None]] = []
        check = held.checker(spawned)
        attempt, _ = held.running(may_refetch=False)
        check.reported(held.live, 2)
        await asyncio.gather(*spawned)
        assert held.forgotten == []  # the origin read cannot take it back now
        check.reported(held.live, 2)  # another child: the piece is not read again meanwhile
        await asyncio.gather(*spawned)
        assert held.reads == 1
        attempt.set_result(None)
        await asyncio.sleep(0)  # done callbacks run on the next loop pass
        assert held.forgotten == [2]
        assert not held.live.state.complete

    asyncio.run(main())
    os.close(held.fd)


def test_a_task_removed_while_its_piece_was_read_back_is_left_alone(tmp_path: Path) -> None:
    held = Held(tmp_path)
    held.live.unchecked = False
    held.flip(0)

    async def main() -> None:
        spawned: list[asyncio.Task[None]] = []
        check = held.checker(spawned)
        check.reported(held.live, 0)
        held.current = False  # the GC removed it (a new download would have its own records)
        await asyncio.gather(*spawned)
        assert held.forgotten == []

    asyncio.run(main())
    os.close(held.fd)
