"""in_own_thread: a blocking call in a daemon thread of its own, its outcome in an asyncio future; the
default executor stays free, and a cancelled future drops the outcome quietly."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dfly.common.own_thread import in_own_thread


def test_the_result_and_the_error_reach_the_future() -> None:
    def fail() -> None:
        raise ValueError("origin said no")

    async def main() -> None:
        assert await in_own_thread("t", lambda a, b: a + b, 2, b=3) == 5
        with pytest.raises(ValueError, match="origin said no"):
            await in_own_thread("t", fail)

    asyncio.run(main())


def test_long_calls_leave_the_default_executor_free() -> None:
    """Ten blocked calls (more than the default executor's workers) and a to_thread call still runs."""
    release = threading.Event()

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))  # fewer than the calls
        blocked = [in_own_thread("long", release.wait, 30) for _ in range(10)]
        try:
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10) == "free"
        finally:
            release.set()
        assert all(await asyncio.gather(*blocked))

    asyncio.run(main())


def test_the_thread_is_a_daemon_and_a_cancelled_future_drops_its_outcome() -> None:
    entered, release = threading.Event(), threading.Event()
    seen: list[threading.Thread] = []

    def call() -> None:
        seen.append(threading.current_thread())
        entered.set()
        release.wait(30)
        raise RuntimeError("nobody waits for this")

    async def main() -> None:
        reports: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reports.append(context))
        future = in_own_thread("origin-read", call)
        await asyncio.to_thread(entered.wait, 10)
        assert seen[0].daemon
        assert seen[0].name == "origin-read"
        future.cancel()
        release.set()
        await asyncio.to_thread(seen[0].join, 10)
        await asyncio.sleep(0)  # the thread's hand-over runs: nothing is set on the cancelled future
        assert future.cancelled()
        assert reports == []  # no InvalidStateError from setting a cancelled future

    asyncio.run(main())


def test_a_thread_that_cannot_start_fails_the_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process or cgroup thread limit: the caller's error path runs (and gives back what it holds)."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await in_own_thread("origin-read", lambda: None)

    asyncio.run(main())
