"""A piece the daemon forgets (its bytes proved to be of another object) loses its storage record too:
durable, pending, or that of a write still queued when it was forgotten, so no restart trusts it. With
it: the validators of a changed object are recorded only after the old object's records are gone, a
parent's copy that lands after the peer began to read the origin is not used, a piece written twice is
one pending record, and a piece record that is not a number is a one-line storage error."""

from __future__ import annotations

import asyncio
import os
import random
import time
import zlib
from pathlib import Path

import pytest

from dfly.common.errors import SourceError, StorageError
from dfly.daemon.back_to_source import BackToSource
from dfly.daemon.conductor import Conductor
from dfly.daemon.config import DaemonConfig
from dfly.daemon.context import Counters, DaemonContext
from dfly.daemon.core.task_state import Layout, TaskState
from dfly.daemon.source import http
from dfly.daemon.storage import Storage, StoredTask, TaskMeta
from dfly.daemon.task_request import TaskRequest
from dfly.daemon.tasks import TaskManager
from dfly.daemon.transfer.buffers import BufferPool
from dfly.devtools.origin import Origin

pytestmark = pytest.mark.timeout(30)

PIECE = 64 * 1024
URL = "https://example.com/forget.bin"


def piece(number: int, version: int = 0) -> tuple[bytes, int]:
    data = random.Random(f"{number}/{version}").randbytes(PIECE)
    return data, zlib.crc32(data)


def make_meta(task_id: str) -> TaskMeta:
    return TaskMeta(task_id, URL, 4 * PIECE, PIECE, {})


async def write(storage: Storage, meta: TaskMeta, number: int, version: int = 0) -> int:
    data, digest = piece(number, version)
    await storage.write_piece(meta.task_id, number, number * PIECE, data, digest)
    return digest


async def with_new_task(root: Path, meta: TaskMeta, commit_interval_s: float = 3600) -> Storage:
    """An open storage in `root` that has just created the task `meta` (no group commit until the
    interval, a forced one or the close)."""
    storage = Storage(root, commit_interval_s=commit_interval_s)
    await storage.open()
    await storage.create_task(meta)
    return storage


async def finished_task(root: Path, meta: TaskMeta) -> None:
    storage = await with_new_task(root, meta)
    for n in range(4):
        await write(storage, meta, n)
    await storage.finish_task(meta.task_id)
    await storage.close()


async def reopen(root: Path) -> dict[str, StoredTask]:
    storage = Storage(root)
    tasks = await storage.open()
    await storage.close()
    return {t.meta.task_id: t for t in tasks}


class HeldWrites:
    """Holds every `storage.write_piece` call, once made, until `go_on` is set: a copy still being
    written. `restore()` puts the storage's own method back."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.started, self.go_on = asyncio.Event(), asyncio.Event()
        self._write_piece = storage.write_piece
        storage.write_piece = self._held  # type: ignore[method-assign,assignment]

    async def _held(self, *args: object) -> None:
        self.started.set()
        await self.go_on.wait()
        await self._write_piece(*args)  # type: ignore[arg-type]

    def restore(self) -> None:
        self.storage.write_piece = self._write_piece  # type: ignore[method-assign]


def manager_on(storage: Storage) -> TaskManager:
    config = DaemonConfig.model_validate({"storage": {"dir": str(storage.root)}})
    ctx = DaemonContext(
        config=config,
        host_id="127.0.0.1-test",
        hostname="test",
        ip="127.0.0.1",
        seed=False,
        storage=storage,
        scheduler=None,
        pool=BufferPool(1 << 20),
        counters=Counters(),
        rng=random.Random(0),
    )
    return TaskManager(ctx)


def test_pieces_the_daemon_forgets_are_not_recovered(tmp_path: Path) -> None:
    """The scheduler's verdict rejects piece 1 of a complete task (durable record), the piece is fetched
    again (pending record) and rejected again before any group commit: neither record may come back."""
    request = TaskRequest(URL)
    meta = make_meta(request.task_id)

    async def run() -> None:
        await finished_task(tmp_path, meta)
        storage = Storage(tmp_path, commit_interval_s=3600)  # no commit but the final one and forced ones
        manager = manager_on(storage)
        manager.load(await storage.open())
        state = manager.start(request).state  # complete: served from storage, no attempt started
        assert state.complete
        state.forget_pieces([1])
        digest = await write(storage, meta, 1, version=1)  # fetched again, as Conductor.store_piece does
        assert state.mark_available(1, digest)
        state.forget_pieces([1])  # rejected again while its record is pending
        await storage.close()  # clean: the final group commit runs

    asyncio.run(run())
    task = asyncio.run(reopen(tmp_path))[meta.task_id]
    assert sorted(task.pieces) == [0, 2, 3]
    assert not task.finished


def test_a_forgotten_pending_record_is_not_in_a_later_commit(tmp_path: Path) -> None:
    meta = make_meta("task-pending")

    async def run() -> None:
        storage = await with_new_task(tmp_path, meta, commit_interval_s=0.05)
        await write(storage, meta, 0)
        await write(storage, meta, 1)
        storage.forget_pieces(meta.task_id, [1])  # its pwrite done, its record not durable yet
        await write(storage, meta, 2)
        while storage.stats()["pending_records"]:
            await storage.wait_for_commit()
        await storage.close(clean=False)

    asyncio.run(run())
    assert sorted(asyncio.run(reopen(tmp_path))[meta.task_id].pieces) == [0, 2]


def test_a_forgotten_durable_record_is_gone_after_a_crash(tmp_path: Path) -> None:
    meta = make_meta("task-durable")

    async def run() -> None:
        storage = await with_new_task(tmp_path, meta)
        await write(storage, meta, 0)
        await write(storage, meta, 1)
        await storage.close()  # both records durable
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        commits = storage.commits
        storage.forget_pieces(meta.task_id, [1])
        await storage.wait_for_commit(commits + 1)  # a forget of durable records commits at once
        await storage.close(clean=False)

    asyncio.run(run())
    assert sorted(asyncio.run(reopen(tmp_path))[meta.task_id].pieces) == [0]


def test_a_write_queued_before_the_forget_is_not_recorded_and_a_later_one_is(tmp_path: Path) -> None:
    meta = make_meta("task-queued")

    async def run() -> None:
        storage = await with_new_task(tmp_path, meta)
        first = await write(storage, meta, 0)
        queued = [asyncio.ensure_future(write(storage, meta, n)) for n in (2, 3)]
        await asyncio.sleep(0)  # a yield, not a wait: each write's first step queues its operation
        storage.forget_pieces(meta.task_id, [2, 3])  # queued behind both writes
        await asyncio.gather(*queued)
        new = await write(storage, meta, 2, version=1)  # queued after the forget: recorded
        await storage.close()
        assert (await reopen(tmp_path))[meta.task_id].pieces == {0: first, 2: new}

    asyncio.run(run())


def test_forgetting_durable_records_unfinishes_the_task(tmp_path: Path) -> None:
    meta = make_meta("task-finished")

    async def run() -> None:
        await finished_task(tmp_path, meta)
        storage = Storage(tmp_path, commit_interval_s=3600)
        await storage.open()
        storage.forget_pieces(meta.task_id, [0, 3])
        await storage.wait_for_commit()
        with pytest.raises(StorageError, match="2 of 4 pieces stored"):
            await storage.finish_task(meta.task_id)  # the writer no longer counts them either
        await storage.close(clean=False)

    asyncio.run(run())
    task = asyncio.run(reopen(tmp_path))[meta.task_id]
    assert sorted(task.pieces) == [1, 2]
    assert not task.finished


def test_new_validators_are_recorded_after_the_old_pieces_records_are_gone(tmp_path: Path) -> None:
    """The origin's object changed: the held pieces are forgotten, then the task takes the new object's
    validators. After a restart the task has the new validators and, of the pieces, only the one of the
    new object written since."""

    async def main() -> None:
        meta = TaskMeta("t-validators", URL, 4 * PIECE, PIECE, {"ETag": '"old"'})
        await finished_task(tmp_path, meta)
        storage = Storage(tmp_path)
        await storage.open()
        storage.forget_pieces(meta.task_id, range(4))
        storage.set_response_headers(meta.task_id, {"ETag": '"new"'})
        assert storage.task_meta(meta.task_id).response_headers == {"ETag": '"new"'}  # type: ignore[union-attr]
        new_0 = await write(storage, meta, 0, version=1)
        await storage.close()
        task = (await reopen(tmp_path))[meta.task_id]
        assert task.meta.response_headers == {"ETag": '"new"'}
        assert task.pieces == {0: new_0}
        assert not task.finished

    asyncio.run(main())


def test_new_validators_of_a_task_not_yet_recorded_are_inserted_with_it(tmp_path: Path) -> None:
    async def main() -> None:
        meta = TaskMeta("t-fresh", URL, 4 * PIECE, PIECE, {"ETag": '"a"'})
        storage = await with_new_task(tmp_path, meta)  # its record is written at the next group commit
        storage.set_response_headers(meta.task_id, {"ETag": '"b"'})
        await storage.close()
        assert (await reopen(tmp_path))[meta.task_id].meta.response_headers == {"ETag": '"b"'}

    asyncio.run(main())


def test_a_parent_copy_written_after_going_back_to_source_is_not_used(tmp_path: Path) -> None:
    """A piece from a parent whose write was in flight when the peer began to read the origin (which may
    hold another object by now) is not made available: the origin read writes it again (a file mixing
    two objects otherwise, when the origin's object changed)."""
    request = TaskRequest(URL)
    meta = make_meta(request.task_id)

    async def run() -> None:
        storage = Storage(tmp_path, commit_interval_s=3600)
        manager = manager_on(storage)
        await storage.open()
        await storage.create_task(meta)
        state = TaskState(request.task_id, URL)
        state.set_layout(meta.content_length, meta.piece_length)
        conductor = Conductor(manager.ctx, state, request, asyncio.Event())
        held = HeldWrites(storage)
        data, digest = piece(2)
        store = asyncio.ensure_future(conductor.store_piece(2, memoryview(data), digest, "remote_peer", "p"))
        await asyncio.wait_for(held.started.wait(), 10)
        conductor._back_to_source = asyncio.ensure_future(asyncio.sleep(0))  # as _go_back_to_source does
        held.go_on.set()
        await asyncio.wait_for(store, 10)
        await conductor._back_to_source
        assert not state.has(2)
        await storage.close()

    asyncio.run(run())


def test_a_piece_written_twice_before_a_commit_is_one_pending_record(tmp_path: Path) -> None:
    meta = make_meta("task-twice")

    async def run() -> None:
        storage = await with_new_task(tmp_path, meta)
        await write(storage, meta, 2)
        await write(storage, meta, 2, version=1)  # e.g. the origin's copy after a parent's
        assert storage.stats()["pending_records"] == 1
        await storage.close()
        assert storage.stats()["pending_records"] == 0

    asyncio.run(run())


def test_an_old_objects_piece_never_survives_under_the_new_validators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent's copy of piece 3 (of the old object) is still being written when the peer goes back to
    source, and the origin's object has changed. The origin read fails before it reaches piece 3 (or the
    daemon dies there). After a restart the task must not hold the old piece under the new object's
    validators: the next read would skip it and deliver a file of two objects."""
    with Origin(tmp_path / "www") as origin:
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        path = origin.root / "f.bin"
        old = b"".join(piece(n)[0] for n in range(4))
        path.write_bytes(old)
        url = origin.url("/f.bin")
        request = TaskRequest(url)

        async def run() -> None:
            storage = Storage(tmp_path / "data", commit_interval_s=3600)
            manager = manager_on(storage)
            await storage.open()
            # the task's state as the manager makes it, without the attempt `manager.start` would run (with
            # no scheduler, that attempt reads the origin itself and races this test's own reads)
            state = TaskState(request.task_id, url)
            state.on_forget = storage.forget_pieces
            conductor = Conductor(manager.ctx, state, request, asyncio.Event())
            old_stat = http.stat(url, {}, timeout_s=5)
            await conductor.file.ensure(Layout(4 * PIECE, PIECE), dict(old_stat.headers))
            held = HeldWrites(storage)
            store = asyncio.ensure_future(
                conductor.store_piece(
                    3, memoryview(old[3 * PIECE :]), zlib.crc32(old[3 * PIECE :]), "remote_peer", "p"
                )
            )
            await asyncio.wait_for(held.started.wait(), 10)
            path.write_bytes(b"".join(piece(n, version=1)[0] for n in range(4)))  # the object changes
            os.utime(path, (time.time() + 10, time.time() + 10))
            conductor._back_to_source = asyncio.ensure_future(asyncio.sleep(0))  # as _go_back_to_source does
            held.go_on.set()
            await asyncio.wait_for(store, 10)
            await conductor._back_to_source
            held.restore()

            def origin_gone(*args: object, **kwargs: object) -> None:
                raise SourceError("the origin went away")

            monkeypatch.setattr(http, "read_pieces", origin_gone)
            with pytest.raises(SourceError):
                await BackToSource(conductor, None)._run()
            await storage.close()

        asyncio.run(run())
        new_etag = http.stat(url, {}, timeout_s=5).etag
    task = asyncio.run(reopen(tmp_path / "data"))[request.task_id]
    assert task.meta.response_headers.get("ETag") == new_etag
    assert task.pieces == {}  # not piece 3 of the old object
