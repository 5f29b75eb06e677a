"""TaskManager's own tasks: close() also cancels those started while the first ones were ending, and a
background task's unexpected error is logged when it happens."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from dfly.daemon.config import DaemonConfig
from dfly.daemon.context import Counters, DaemonContext
from dfly.daemon.tasks import TaskManager
from dfly.daemon.transfer.buffers import BufferPool


class _NoStorage:
    def forget_pieces(self, task_id: str) -> None:  # what TaskManager takes from storage at start
        raise AssertionError("not used here")


def manager(tmp_path: Path) -> TaskManager:
    ctx = DaemonContext(
        config=DaemonConfig.model_validate({"storage": {"dir": str(tmp_path)}}),
        host_id="127.0.0.1-test",
        hostname="test",
        ip="127.0.0.1",
        seed=False,
        storage=_NoStorage(),  # type: ignore[arg-type]
        scheduler=None,
        pool=BufferPool(1 << 20),
        counters=Counters(),
        rng=random.Random(0),
    )
    return TaskManager(ctx)


def test_close_cancels_tasks_started_while_it_closes(tmp_path: Path) -> None:
    async def main() -> None:
        tasks = manager(tmp_path)
        late: list[asyncio.Task[bool]] = []

        async def on_cancel_starts_another() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                late.append(tasks._spawn(asyncio.Event().wait()))  # e.g. a removal after a failed attempt

        first = tasks._spawn(on_cancel_starts_another())
        await asyncio.sleep(0)
        await asyncio.wait_for(tasks.close(), 10)
        assert first.cancelled()
        assert late[0].cancelled()
        assert not tasks._tasks
        after = tasks._spawn(asyncio.Event().wait())  # e.g. a report while the piece server closes
        await asyncio.wait([after], timeout=10)
        assert after.cancelled()

    asyncio.run(main())


def test_a_background_failure_is_logged_when_it_happens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise OSError("disk gone")

    async def main() -> None:
        tasks = manager(tmp_path)
        failed = tasks._spawn(broken())
        await asyncio.wait([failed])
        await asyncio.sleep(0)  # its done callbacks run

    with caplog.at_level(logging.ERROR, logger="dfly.daemon.tasks"):
        asyncio.run(main())
    [record] = [r for r in caplog.records if r.name == "dfly.daemon.tasks"]
    assert "background task" in record.getMessage()
    assert record.exc_info is not None
    assert "disk gone" in str(record.exc_info[1])
