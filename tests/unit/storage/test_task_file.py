"""A held copy meets the first layout and headers an attempt learns (daemon/task_file.py), on real storage.

The copy is held as after a restart: recovered from storage, its file not yet confirmed. Headers naming
the same object keep its pieces; other validators forget them (records too, before the new validators
are recorded); another layout drops the copy in place, and the task goes on with the new one. Once
confirmed, another layout is a StaleCopy error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_storage_forget import PIECE, manager_on, piece, reopen

from dfly.common.errors import StaleCopy
from dfly.daemon.core.task_state import Layout
from dfly.daemon.storage import Storage, TaskMeta
from dfly.daemon.task_file import TaskFile
from dfly.daemon.task_request import TaskRequest
from dfly.daemon.tasks import TaskManager

pytestmark = pytest.mark.timeout(30)

REQUEST = TaskRequest("https://example.com/held.bin")
HELD = Layout(4 * PIECE, PIECE)
OLD = {"ETag": '"old"'}


async def held_copy(root: Path) -> tuple[Storage, TaskManager, TaskFile]:
    """Pieces 0 and 1 of the old object stored and committed; the storage reopened and loaded."""
    storage = Storage(root, commit_interval_s=3600)
    await storage.open()
    await storage.create_task(TaskMeta(REQUEST.task_id, REQUEST.url, HELD.content_length, PIECE, OLD))
    for n in (0, 1):
        data, digest = piece(n)
        await storage.write_piece(REQUEST.task_id, n, n * PIECE, data, digest)
    await storage.close()
    storage = Storage(root, commit_interval_s=3600)
    manager = manager_on(storage)
    manager.load(await storage.open())
    held = manager._live[REQUEST.task_id]
    assert held.state.available_pieces() == [0, 1]
    assert not held.file_ready.is_set()  # a partial copy: nobody is told of it before it is confirmed
    return storage, manager, TaskFile(manager.ctx, held.state, REQUEST, held.file_ready)


def test_headers_of_the_same_object_keep_the_held_pieces(tmp_path: Path) -> None:
    async def run() -> None:
        storage, _, task_file = await held_copy(tmp_path)
        await task_file.ensure(HELD, {**OLD, "Content-Type": "text/plain"})
        assert task_file.ready.is_set()
        assert task_file.state.available_pieces() == [0, 1]
        await storage.close()

    asyncio.run(run())
    assert sorted(asyncio.run(reopen(tmp_path))[REQUEST.task_id].pieces) == [0, 1]


def test_other_validators_forget_the_held_pieces_and_record_the_new_ones(tmp_path: Path) -> None:
    async def run() -> None:
        storage, _, task_file = await held_copy(tmp_path)
        await task_file.ensure(HELD, {"ETag": '"new"'})  # e.g. the scheduler's layout of the task now
        assert task_file.ready.is_set()
        assert task_file.state.available_pieces() == []
        assert task_file.state.response_headers == {"ETag": '"new"'}
        await storage.close()

    asyncio.run(run())
    task = asyncio.run(reopen(tmp_path))[REQUEST.task_id]
    assert task.meta.response_headers == {"ETag": '"new"'}
    assert task.pieces == {}


def test_another_layout_drops_the_held_copy_and_the_task_goes_on_with_the_new_one(tmp_path: Path) -> None:
    new = Layout(3 * PIECE, PIECE)

    async def run() -> None:
        storage, _, task_file = await held_copy(tmp_path)
        await task_file.ensure(new, {"ETag": '"new"'})
        assert task_file.ready.is_set()
        assert task_file.state.layout == new
        assert task_file.state.available_pieces() == []
        data, digest = piece(2)
        await storage.write_piece(REQUEST.task_id, 2, 2 * PIECE, data, digest)
        await storage.close()

    asyncio.run(run())
    task = asyncio.run(reopen(tmp_path))[REQUEST.task_id]
    assert (task.meta.content_length, task.meta.response_headers) == (3 * PIECE, {"ETag": '"new"'})
    assert sorted(task.pieces) == [2]
    assert Storage(tmp_path).task_path(REQUEST.task_id).stat().st_size == 3 * PIECE


def test_once_confirmed_another_layout_is_a_stale_copy(tmp_path: Path) -> None:
    async def run() -> None:
        storage, _, task_file = await held_copy(tmp_path)
        await task_file.ensure(HELD, OLD)
        with pytest.raises(StaleCopy, match="partial copy has another layout"):
            await task_file.ensure(Layout(3 * PIECE, PIECE), OLD)
        assert task_file.state.available_pieces() == [0, 1]
        await storage.close()

    asyncio.run(run())
