"""Conductor.spawn once its attempt is ending: the helper is not started and says so."""

from __future__ import annotations

import asyncio
import warnings
from types import SimpleNamespace

from dfly.daemon.conductor import Conductor


def test_spawn_after_the_task_group_ended_closes_the_coroutine_and_says_false() -> None:
    """A piece arriving while the daemon stopped logged 'TaskGroup ... is shutting down' and a
    coroutine never awaited; its buffer went nowhere."""

    async def main() -> None:
        ran = []

        async def helper() -> None:
            ran.append(True)

        attempt = SimpleNamespace(_helpers=set())
        async with asyncio.TaskGroup() as tg:
            attempt.tg = tg
            assert Conductor.spawn(attempt, helper()) is True  # type: ignore[arg-type]
        coro = helper()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine ... was never awaited" would be an error here
            assert Conductor.spawn(attempt, coro) is False  # type: ignore[arg-type]
        assert coro.cr_frame is None  # type: ignore[attr-defined]  # closed
        assert ran == [True]

    asyncio.run(main())
