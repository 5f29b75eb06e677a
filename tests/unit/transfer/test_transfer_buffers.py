"""BufferPool: budget, FIFO waiters, oversize requests, reuse, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from dfly.daemon.transfer.buffers import BufferPool


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_budget_blocks_until_release() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        a = await pool.acquire(60)
        b = await pool.acquire(40)
        assert len(a) == 60
        assert pool.bytes_out == 100
        waiter = asyncio.ensure_future(pool.acquire(30))
        await asyncio.sleep(0)
        assert not waiter.done()
        assert pool.waiting == 1
        pool.release(b)
        c = await waiter
        assert len(c) == 30
        assert pool.bytes_out == 90
        pool.release(a)
        pool.release(c)
        assert pool.bytes_out == 0

    run(main())


def test_same_size_buffers_are_reused() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        a = await pool.acquire(50)
        pool.release(a)
        assert pool.bytes_idle == 50
        assert await pool.acquire(50) is a
        assert pool.bytes_idle == 0

    run(main())


def test_idle_buffers_of_other_sizes_are_dropped_for_room() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        a = await pool.acquire(60)
        pool.release(a)
        b = await pool.acquire(70)  # 60 idle + 70 > 100: the idle buffer goes
        assert pool.bytes_idle == 0
        assert pool.bytes_out == 70
        pool.release(b)

    run(main())


def test_oversize_request_granted_when_nothing_is_out() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        small = await pool.acquire(10)
        big = asyncio.ensure_future(pool.acquire(500))
        later = asyncio.ensure_future(pool.acquire(10))  # FIFO: waits behind the big one
        await asyncio.sleep(0)
        assert not big.done()
        assert not later.done()
        pool.release(small)
        buf = await big
        assert len(buf) == 500
        await asyncio.sleep(0)
        assert not later.done()
        pool.release(buf)
        assert len(await later) == 10

    run(main())


def test_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        a = await pool.acquire(100)
        first = asyncio.ensure_future(pool.acquire(50))
        second = asyncio.ensure_future(pool.acquire(50))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        pool.release(a)
        assert len(await second) == 50
        assert pool.waiting == 0
        assert pool.bytes_out == 50

    run(main())


def test_release_checks_ownership() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        a = await pool.acquire(10)
        pool.release(a)
        with pytest.raises(ValueError, match="released twice"):
            pool.release(a)
        with pytest.raises(ValueError, match="not handed out"):
            pool.release(bytearray(10))
        with pytest.raises(ValueError, match="positive"):
            await pool.acquire(0)
        with pytest.raises(ValueError, match="positive"):
            BufferPool(0)

    run(main())


def test_room_for_counts_what_can_be_taken_without_waiting() -> None:
    async def main() -> None:
        pool = BufferPool(100)
        assert pool.room_for(30) == 3
        assert pool.room_for(250) == 1  # one oversize buffer is granted while nothing is out
        a = await pool.acquire(60)
        assert pool.room_for(30) == 1
        assert pool.room_for(50) == 0
        waiter = asyncio.ensure_future(pool.acquire(50))
        await asyncio.sleep(0)
        assert pool.room_for(10) == 0  # others wait: first come, first served
        pool.release(a)
        pool.release(await waiter)

    run(main())
