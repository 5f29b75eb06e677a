"""Virtual clock: a heap of (time, sequence, callback, argument); no wall clock anywhere in the model.

Callbacks run in time order, ties in the order they were scheduled, so a run is a pure function of its
inputs and its seeded random.Random. Cancelling is lazy: callers check a version they carry in `arg`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], None]


class Clock:
    __slots__ = ("_heap", "_seq", "events", "now", "stopped")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self.stopped = False
        self._heap: list[tuple[float, int, Callback, Any]] = []
        self._seq = 0

    def at(self, when: float, callback: Callback, arg: Any = None) -> None:
        """Run `callback(arg)` at virtual time `when` (never earlier than now)."""
        self._seq += 1
        heapq.heappush(self._heap, (when if when > self.now else self.now, self._seq, callback, arg))

    def after(self, delay_s: float, callback: Callback, arg: Any = None) -> None:
        self.at(self.now + delay_s, callback, arg)

    def run(self, until: float) -> None:
        """Run callbacks until the heap is empty, `stop()` was called, or the next one is past `until`."""
        heap = self._heap
        pop = heapq.heappop
        while heap and not self.stopped:
            if heap[0][0] > until:
                self.now = until
                return
            when, _, callback, arg = pop(heap)
            self.now = when
            self.events += 1
            callback(arg)

    def stop(self) -> None:
        self.stopped = True

    @property
    def pending(self) -> int:
        return len(self._heap)
