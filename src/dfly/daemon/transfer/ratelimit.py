"""Token bucket in bytes per second: the daemon's upload limit (`upload.rate_limit_bytes_per_s`).

`BucketCore` is the pure arithmetic (time is a parameter, never read); `TokenBucket` is the asyncio wrapper.

Rules:
- The bucket holds at most `burst_bytes` tokens and starts full. A reservation always succeeds and may
  take the bucket into debt; the caller then waits `debt / rate` seconds before sending. So a piece
  larger than the burst is charged whole, callers are served in arrival order (each later caller sees
  the earlier debt), and the long-run rate is exact.
- Default burst: max(rate / 10, 64 KiB), i.e. about 100 ms of traffic. Because debt is allowed the burst
  only bounds how much idle credit accumulates; it does not need to cover a whole piece.
- Rate 0 means unlimited: `acquire` returns at once without touching the clock. Burst None or 0 means
  the default.
- A waiter cancelled while waiting gets its bytes refunded; so does one whose `unless` event is set while
  it waits (`acquire` then returns False: the bytes are not to be sent).
"""

from __future__ import annotations

import asyncio

DEFAULT_BURST_WINDOW_S = 0.1
MIN_BURST_BYTES = 64 * 1024


def default_burst(rate_bytes_per_s: int) -> int:
    return max(int(rate_bytes_per_s * DEFAULT_BURST_WINDOW_S), MIN_BURST_BYTES)


class BucketCore:
    """Pure token bucket. `reserve(nbytes, now)` returns how long to wait (0.0 = send now)."""

    def __init__(self, rate_bytes_per_s: int, burst_bytes: int | None = None, now: float | None = None):
        """`now=None`: the clock starts (with a full bucket) at the first call that passes a time."""
        self.rate = 0
        self.burst = 0
        self.tokens = 0.0
        self._last = now
        self.configure(rate_bytes_per_s, burst_bytes, now)
        self.tokens = float(self.burst)

    def configure(self, rate_bytes_per_s: int, burst_bytes: int | None, now: float | None = None) -> None:
        """Change the rate (e.g. from dynamic config); accrued credit is kept up to the new burst."""
        if rate_bytes_per_s < 0 or (burst_bytes is not None and burst_bytes < 0):
            raise ValueError(f"bad token bucket rate={rate_bytes_per_s} burst={burst_bytes}")
        self._refill(now)
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes or default_burst(rate_bytes_per_s)
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self, now: float | None) -> None:
        if now is None:
            return
        if self._last is None:
            self._last = now
        elif now > self._last:
            self.tokens = min(float(self.burst), self.tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, nbytes: int, now: float) -> float:
        if nbytes < 0:
            raise ValueError(f"cannot reserve {nbytes} bytes")
        if self.rate == 0:
            return 0.0
        self._refill(now)
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self, nbytes: int, now: float) -> None:
        if self.rate:
            self._refill(now)
            self.tokens = min(float(self.burst), self.tokens + nbytes)


class TokenBucket:
    """asyncio token bucket: `await acquire(n)` returns when `n` bytes may be sent."""

    def __init__(self, rate_bytes_per_s: int, burst_bytes: int | None = None) -> None:
        self._core = BucketCore(rate_bytes_per_s, burst_bytes)

    @property
    def rate(self) -> int:
        return self._core.rate

    @property
    def burst(self) -> int:
        return self._core.burst

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def set_rate(self, rate_bytes_per_s: int, burst_bytes: int | None = None) -> None:
        """Change the rate at run time (call on the loop's thread)."""
        self._core.configure(rate_bytes_per_s, burst_bytes, self._now())

    def refund(self, nbytes: int) -> None:
        """Give back `nbytes` acquired but not sent."""
        self._core.refund(nbytes, self._now())

    async def acquire(self, nbytes: int, unless: asyncio.Event | None = None) -> bool:
        """Wait until `nbytes` may be sent: True; False (bytes refunded) if `unless` is set meanwhile."""
        if unless is not None and unless.is_set():
            return False
        if self._core.rate == 0:
            return True
        wait_s = self._core.reserve(nbytes, self._now())
        if wait_s <= 0:
            return True
        try:
            if unless is None:
                await asyncio.sleep(wait_s)
                return True
            try:
                async with asyncio.timeout(wait_s):
                    await unless.wait()
            except TimeoutError:
                return True
        except asyncio.CancelledError:
            self._core.refund(nbytes, self._now())
            raise
        self._core.refund(nbytes, self._now())
        return False
