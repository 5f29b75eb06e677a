"""A daemon holding many tasks keeps a bounded number of task fds open: at most MAX_OPEN_FILES for
writing (new tasks count too) and MAX_READ_FDS for reading, least recently used closed first; every
task stays writable and readable after its fd was closed."""

from __future__ import annotations

import asyncio
import os
import zlib
from pathlib import Path

import pytest

from dfly.daemon.storage import Storage, TaskMeta
from dfly.daemon.storage import storage as storage_module
from dfly.daemon.storage import writer as writer_module

PIECE = 4096
TASKS = 12
LIMIT = 4


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def meta(n: int) -> TaskMeta:
    return TaskMeta(f"task-{n:03}", f"https://example.com/{n}", PIECE, PIECE, {})


def test_task_fds_stay_bounded_and_tasks_stay_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "MAX_OPEN_FILES", LIMIT)
    monkeypatch.setattr(storage_module, "MAX_READ_FDS", LIMIT)

    async def scenario() -> None:
        storage = Storage(tmp_path, commit_interval_s=30)
        await storage.open()
        before = open_fds()
        for n in range(TASKS):
            await storage.create_task(meta(n))
        assert open_fds() - before <= LIMIT  # each new task's write fd counts against the bound
        for n in range(TASKS):
            data = bytes([n]) * PIECE
            await storage.write_piece(meta(n).task_id, 0, 0, data, zlib.crc32(data))
            await storage.finish_task(meta(n).task_id)
        assert open_fds() - before <= LIMIT
        for n in range(TASKS):
            assert os.pread(storage.read_fd(meta(n).task_id), PIECE, 0) == bytes([n]) * PIECE
        assert storage.stats()["open_read_fds"] == LIMIT
        assert open_fds() - before <= 2 * LIMIT
        for n in range(TASKS):  # closed fds are opened again on demand, for the right file
            assert os.pread(storage.read_fd(meta(n).task_id), 1, 0) == bytes([n])
        await storage.close()

    asyncio.run(scenario())
