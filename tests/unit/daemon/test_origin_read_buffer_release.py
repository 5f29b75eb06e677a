"""An origin read's borrowed buffer goes back to the pool exactly once, and only after the reading
thread has let go of it: when the read ends, when it is cancelled, and when it is cancelled again while
waiting for the thread (that buffer used to be lost from the pool's budget for good)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from dfly.daemon.back_to_source import BackToSource, await_thread_holding
from dfly.daemon.transfer.buffers import BufferPool


class Release:
    """Counts releases; `happened` is set on the first."""

    def __init__(self) -> None:
        self.count = 0
        self.happened = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.happened.set()


def test_a_finished_read_releases_its_buffer_once() -> None:
    async def main() -> None:
        release = Release()
        thread = asyncio.ensure_future(asyncio.to_thread(lambda: 7))
        assert await await_thread_holding(thread, lambda: None, release) == 7
        assert release.count == 1

    asyncio.run(main())


def test_a_cancelled_read_stops_the_thread_and_releases_after_it() -> None:
    async def main() -> None:
        release = Release()
        stop = threading.Event()
        entered = threading.Event()

        def read() -> None:
            entered.set()
            stop.wait(10)  # the thread keeps the buffer until asked to stop

        thread = asyncio.ensure_future(asyncio.to_thread(read))
        waiter = asyncio.ensure_future(await_thread_holding(thread, stop.set, release))
        await asyncio.to_thread(entered.wait, 10)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert thread.done()
        assert release.count == 1

    asyncio.run(main())


def test_a_read_cancelled_twice_releases_when_its_thread_ends() -> None:
    async def main() -> None:
        release = Release()
        finish = threading.Event()
        entered = threading.Event()
        asked_to_stop = asyncio.Event()

        def read() -> None:
            entered.set()
            finish.wait(10)  # a thread slow to notice the stop: still filling the buffer

        thread = asyncio.ensure_future(asyncio.to_thread(read))
        waiter = asyncio.ensure_future(await_thread_holding(thread, asked_to_stop.set, release))
        await asyncio.to_thread(entered.wait, 10)
        waiter.cancel()
        await asyncio.wait_for(asked_to_stop.wait(), 10)  # first cancellation: now waiting for the thread
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert release.count == 0  # the thread still writes into it: not back in the pool yet
        finish.set()
        await asyncio.wait_for(release.happened.wait(), 10)
        assert release.count == 1

    asyncio.run(main())


def test_the_buffer_waits_for_a_piece_write_that_still_reads_it() -> None:
    """A halted read returns while its last piece write (abandoned by StoreHandoff) may still copy from
    the buffer: the buffer goes back to the pool only once that write ended, cancelled or not."""
    writing, finish = asyncio.Event(), asyncio.Event()

    async def store_piece(*_: object) -> None:
        """As storage's write_piece: a cancel waits for the writer thread to let go of the bytes."""
        writing.set()
        copied = asyncio.ensure_future(finish.wait())  # the writer thread still copying from the buffer
        try:
            await asyncio.shield(copied)
        except asyncio.CancelledError:
            await copied
            raise

    async def main() -> None:
        pool = BufferPool(1 << 20)
        conductor = SimpleNamespace(ctx=SimpleNamespace(pool=pool), store_piece=store_piece)
        reader = BackToSource(conductor, None)  # type: ignore[arg-type]  # the two fields it uses
        buffer = await pool.acquire(256 * 1024)
        write = asyncio.ensure_future(reader._store(0, memoryview(buffer), 0))
        await writing.wait()
        write.cancel()  # as StoreHandoff does at a stop: the write goes on (storage shields it)
        reader._release_when_written(buffer)
        for _ in range(5):
            await asyncio.sleep(0)  # the cancel lands; the write still copies
        assert not write.done()
        assert pool.bytes_out == 256 * 1024  # still lent: the write reads it
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await write
        await asyncio.sleep(0)  # the done callbacks run
        assert pool.bytes_out == 0
        idle = BackToSource(conductor, None)  # type: ignore[arg-type]
        spare = await pool.acquire(4096)
        idle._release_when_written(spare)  # no write in progress: back at once
        assert pool.bytes_out == 0

    asyncio.run(main())
