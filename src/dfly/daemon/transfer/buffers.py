"""Receive-buffer pool with a byte budget (`download.buffer_bytes`, default 32 MiB).

Piece bodies are received straight into these buffers (see client.py), so the budget bounds the memory
of all pieces in flight and not yet written.

Rules:
- `acquire(size)` returns a bytearray of exactly `size` bytes, reusing a released buffer of that size
  when there is one. It waits while the bytes handed out plus `size` would exceed the budget; a single
  request larger than the whole budget is granted when nothing else is out (no deadlock).
- Waiters are served first come, first served, so large requests are not starved by small ones.
- Idle buffers kept for reuse count against the budget too; they are dropped (oldest size first) when a
  request needs their room.
- `release(buf)` takes back only buffers this pool handed out, each once (ValueError otherwise).
  Single event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    size: int
    future: asyncio.Future[bytearray] = field(repr=False)


class BufferPool:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"buffer budget must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._out: dict[int, bytearray] = {}  # id -> buffer handed out
        self._out_bytes = 0
        self._idle: dict[int, list[bytearray]] = {}  # size -> idle buffers (insertion order = age)
        self._idle_bytes = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def bytes_out(self) -> int:
        return self._out_bytes

    @property
    def bytes_idle(self) -> int:
        return self._idle_bytes

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self._out_bytes == 0 or self._out_bytes + size <= self.budget_bytes

    def _take(self, size: int) -> bytearray:
        idle = self._idle.get(size)
        if idle:
            buf = idle.pop()
            if not idle:
                del self._idle[size]
            self._idle_bytes -= size
        else:
            # Make room: drop idle buffers of other sizes until the new one fits the budget.
            while self._idle and self._out_bytes + self._idle_bytes + size > self.budget_bytes:
                oldest = next(iter(self._idle))
                self._idle[oldest].pop()
                self._idle_bytes -= oldest
                if not self._idle[oldest]:
                    del self._idle[oldest]
            buf = bytearray(size)
        self._out[id(buf)] = buf
        self._out_bytes += size
        return buf

    def room_for(self, size: int) -> int:
        """How many buffers of `size` could be taken now without waiting (none while others wait)."""
        if self._waiters:
            return 0
        if self._out_bytes == 0:
            return max(1, self.budget_bytes // size)  # one buffer over the budget is granted alone
        return max(0, (self.budget_bytes - self._out_bytes) // size)

    def try_acquire(self, size: int) -> bytearray | None:
        """A buffer now if it fits and nobody is waiting, else None."""
        if size <= 0:
            raise ValueError(f"buffer size must be positive, got {size}")
        if self._waiters or not self._fits(size):
            return None
        return self._take(size)

    async def acquire(self, size: int) -> bytearray:
        buf = self.try_acquire(size)
        if buf is not None:
            return buf
        waiter = _Waiter(size, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # granted just as we were cancelled
            else:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._grant()
            raise

    def release(self, buf: bytearray) -> None:
        if self._out.pop(id(buf), None) is not buf:
            raise ValueError("buffer was not handed out by this pool (or was released twice)")
        size = len(buf)
        self._out_bytes -= size
        self._idle.setdefault(size, []).append(buf)
        self._idle_bytes += size
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled; its acquire() is about to unwind
                self._waiters.popleft()
                continue
            if not self._fits(waiter.size):
                return
            self._waiters.popleft()
            waiter.future.set_result(self._take(waiter.size))
