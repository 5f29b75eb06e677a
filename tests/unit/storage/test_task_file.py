"""A held copy meets the first layout and headers an attempt learns (daemon/task_file.py), on real storage.

The copy is held as after a restart: recovered from storage, its file not yet confirmed. Headers naming
the same object keep its pieces; other validators forget them (records too, before the new validators
are recorded); another layout drops the copy in place, and the task goes on with the new one. Once
confirmed, another layout is a StaleCopy error. A held copy complete but never finished (the daemon
died before the finish record) is confirmed by the origin's stat before a client gets a byte of it.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
import zlib
from pathlib import Path

import pytest
from test_storage_forget import PIECE, manager_on, piece, reopen

from dfly.common.errors import StaleCopy
from dfly.common.ids import redact_url
from dfly.daemon.core.task_state import Layout
from dfly.daemon.local_api_messages import DownloadRequest, PiecesReady, Started
from dfly.daemon.storage import Storage, TaskMeta
from dfly.daemon.task_file import TaskFile
from dfly.daemon.task_request import TaskRequest
from dfly.daemon.tasks import TaskManager
from dfly.devtools.origin import Origin

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


async def fetched(manager: TaskManager, url: str) -> tuple[str | None, bytes]:
    """The ETag and bytes a local client of `manager` gets for `url` (as dfget copies them)."""
    request = DownloadRequest(url, "", "", (), {}, PIECE, 20.0, False)
    etag, fd, body = None, -1, bytearray()
    try:
        async for event in manager.download(request):
            if isinstance(event, Started):
                etag, fd, body = (
                    event.response_headers.get("ETag"),
                    event.own_read_fd(),
                    bytearray(event.content_length),
                )
            elif isinstance(event, PiecesReady):
                for n in event.pieces:
                    length = min(PIECE, len(body) - n * PIECE)
                    body[n * PIECE : n * PIECE + length] = os.pread(fd, length, n * PIECE)
    finally:
        if fd >= 0:
            os.close(fd)
    return etag, bytes(body)


@pytest.mark.parametrize("new_pieces", [4, 3], ids=["same-length", "other-length"])
def test_a_complete_unfinished_copy_of_a_changed_object_is_read_again(
    tmp_path: Path, new_pieces: int
) -> None:
    old, new = os.urandom(4 * PIECE), os.urandom(new_pieces * PIECE)
    with Origin(tmp_path / "www") as origin:
        url = origin.add_bytes("f.bin", old)
        task_id = TaskRequest(url, piece_length=PIECE).task_id

        async def run() -> None:
            storage = Storage(tmp_path / "data", commit_interval_s=3600)
            await storage.open()
            old_etag = await asyncio.to_thread(etag_of, url)
            await storage.create_task(TaskMeta(task_id, redact_url(url), len(old), PIECE, {"ETag": old_etag}))
            for n in range(4):
                data = old[n * PIECE : (n + 1) * PIECE]
                await storage.write_piece(task_id, n, n * PIECE, data, zlib.crc32(data))
            await storage.close()  # every piece recorded, the task not finished
            origin.add_bytes("f.bin", new)
            storage = Storage(tmp_path / "data", commit_interval_s=3600)
            manager = manager_on(storage)  # no scheduler: the attempt reads the origin itself
            manager.load(await storage.open())
            etag, body = await fetched(manager, url)
            assert (etag, body) == (await asyncio.to_thread(etag_of, url), new)
            await manager.close()
            await storage.close()

        asyncio.run(run())


def etag_of(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.headers["ETag"])


def test_the_piece_servers_view_of_a_replaced_attempt_offers_no_piece(tmp_path: Path) -> None:
    """Its state still lists the old pieces, but the task's file may hold another copy by now."""

    async def run() -> None:
        storage, manager, task_file = await held_copy(tmp_path)
        assert manager.lookup(REQUEST.task_id) is None  # not confirmed yet: not served
        await task_file.ensure(HELD, OLD)
        view = manager.lookup(REQUEST.task_id)
        assert view is not None
        assert view.piece_digest(0) == piece(0)[1]
        removal = manager.remove(REQUEST.task_id)
        assert removal is not None
        await removal
        assert view.piece_digest(0) is None
        await storage.close()

    asyncio.run(run())
