"""Bad-parent detection from piece costs: is the last piece a parent served an outlier of its own history?

Job: `PieceCosts.record(cost_s)` keeps the costs (request sent → piece verified, as the child reports
them) of the last `WINDOW` pieces a parent served and decides `bad` for the newest one, Dragonfly's rule
(reference/dragonfly.md §3.5) applied to the pieces a parent *served*:
- fewer than 2 earlier costs: never bad;
- fewer than `WINDOW` earlier costs: bad if the newest > `FEW_SAMPLES_FACTOR` (20) × their mean;
- otherwise: bad if the newest > mean + 3 standard deviations of the earlier ones (three-sigma rule).
`bad` holds until the next cost arrives (a good piece clears it). O(1) per record (running sums), no clock
reads; costs ≤ 0 (not measured) are ignored. The caller exempts seeds and origin readers, whose costs
include the queueing every source has.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 30
FEW_SAMPLES_FACTOR = 20.0
SIGMAS = 3.0


class PieceCosts:
    __slots__ = ("_sum", "_sum_sq", "_window", "bad")

    def __init__(self) -> None:
        self._window: deque[float] = deque()
        self._sum = 0.0
        self._sum_sq = 0.0
        self.bad = False

    def __len__(self) -> int:
        return len(self._window)

    def record(self, cost_s: float) -> None:
        if not cost_s > 0 or not math.isfinite(cost_s):
            return
        self.bad = self._is_outlier(cost_s)
        self._window.append(cost_s)
        self._sum += cost_s
        self._sum_sq += cost_s * cost_s
        if len(self._window) > WINDOW:
            old = self._window.popleft()
            self._sum -= old
            self._sum_sq -= old * old

    def _is_outlier(self, cost_s: float) -> bool:
        n = len(self._window)
        if n < 2:
            return False
        mean = self._sum / n
        if n < WINDOW:
            return cost_s > FEW_SAMPLES_FACTOR * mean
        variance = max(0.0, self._sum_sq / n - mean * mean)
        return cost_s > mean + SIGMAS * math.sqrt(variance)
