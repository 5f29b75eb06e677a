"""Token bucket: the pure core on a virtual clock, and the asyncio wrapper's fast paths."""

from __future__ import annotations

import asyncio

import pytest

from dfly.daemon.transfer.ratelimit import BucketCore, TokenBucket, default_burst

MiB = 1024 * 1024


def test_starts_full_then_charges_debt() -> None:
    core = BucketCore(8 * MiB, burst_bytes=MiB, now=0.0)
    assert core.reserve(MiB, 0.0) == 0.0  # the burst is free
    assert core.reserve(4 * MiB, 0.0) == pytest.approx(0.5)  # 4 MiB of debt at 8 MiB/s
    # A second caller queues behind the first one's debt.
    assert core.reserve(MiB, 0.0) == pytest.approx(0.625)


def test_long_run_rate_is_exact() -> None:
    core = BucketCore(10 * MiB, burst_bytes=MiB, now=0.0)
    now = 0.0
    for _ in range(100):  # 100 pieces of 1 MiB, each sent when allowed
        now += core.reserve(MiB, now)
    # The first MiB was burst credit: 99 MiB at 10 MiB/s.
    assert now == pytest.approx(9.9)


def test_refill_is_capped_by_burst() -> None:
    core = BucketCore(MiB, burst_bytes=256 * 1024, now=0.0)
    core.reserve(256 * 1024, 0.0)
    assert core.reserve(512 * 1024, 100.0) == pytest.approx(0.25)  # idle time refilled only the burst


def test_refund_and_reconfigure() -> None:
    core = BucketCore(MiB, burst_bytes=MiB, now=0.0)
    assert core.reserve(2 * MiB, 0.0) == pytest.approx(1.0)
    core.refund(2 * MiB, 0.0)
    assert core.tokens == pytest.approx(MiB)
    core.configure(2 * MiB, None, 0.0)
    assert core.burst == default_burst(2 * MiB)
    assert core.reserve(core.burst + 2 * MiB, 0.0) == pytest.approx(1.0)


def test_zero_rate_is_unlimited_and_defaults() -> None:
    core = BucketCore(0)
    assert core.reserve(10**12, 0.0) == 0.0
    assert default_burst(100 * MiB) == 10 * MiB
    assert default_burst(1000) == 64 * 1024
    assert BucketCore(0, 0).burst == 64 * 1024  # burst 0 = default
    with pytest.raises(ValueError, match="bad token bucket"):
        BucketCore(-1)
    with pytest.raises(ValueError, match="cannot reserve"):
        core.reserve(-1, 0.0)


def test_clock_starts_at_first_use() -> None:
    core = BucketCore(MiB, burst_bytes=MiB)  # built before any clock exists
    assert core.reserve(MiB, 1000.0) == 0.0
    assert core.reserve(MiB, 1000.0) == pytest.approx(1.0)


def test_async_wrapper() -> None:
    async def main() -> None:
        unlimited = TokenBucket(0)
        await unlimited.acquire(10**12)  # returns at once
        bucket = TokenBucket(100 * MiB, burst_bytes=MiB)
        await bucket.acquire(MiB)  # burst: no wait
        waiter = asyncio.ensure_future(bucket.acquire(100 * MiB))  # would wait ~1 s
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert bucket._core.tokens > -MiB  # refunded
        bucket.set_rate(0)
        await bucket.acquire(10**12)
        assert bucket.rate == 0

    asyncio.run(main())


def test_a_wait_ends_without_a_charge_when_its_unless_event_is_set() -> None:
    """A child's CANCEL of the piece waiting for tokens: the tokens go back to the other children."""

    async def main() -> None:
        bucket = TokenBucket(100 * MiB, burst_bytes=MiB)
        assert await bucket.acquire(MiB)
        cancel = asyncio.Event()
        waiter = asyncio.ensure_future(bucket.acquire(100 * MiB, unless=cancel))  # would wait ~1 s
        await asyncio.sleep(0)
        cancel.set()
        assert await waiter is False
        assert bucket._core.tokens > -MiB  # refunded
        assert await bucket.acquire(MiB, unless=cancel) is False  # already set: nothing reserved
        assert bucket._core.tokens > -MiB

    asyncio.run(main())
