"""Flow-level network: every host has an upload and a download link of fixed capacity; a piece transfer
is a flow through the sender's upload link and the receiver's download link.

Fairness `"equal"` (the default: it is the model that matches the netns measurement, docs/simulation.md)
gives each flow min(C_up / n_up, C_down / n_down): exact with local updates, and what a flow limited at
its other end leaves unused stays unused. `"maxmin"` is max-min computed locally: each link water-fills
its capacity among its flows, using as each flow's demand the level (fair share) of the flow's other
link; a flow runs at min(its allocation at the sender, its allocation at the receiver). Allocations are
stored per flow and only a link's own fill changes them, so no link ever carries more than its
capacity, even with stale demands (stale only leaves capacity unused).

Approximations (docs/simulation.md): an event (flow start or end) fills the two links it touches; with
max-min, once more every link one hop away, but only from a link of at most `big_link` flows whose level moved
by more than 0.1 %; effects further away wait for those links' own events. A link carrying more than
`big_link` flows (a seed uplink serving hundreds of children) is filled again only once its flow count
has moved by `drift` (default 2 %) since its last fill: in between a new flow gets the last level and a
finished flow's share stays unused, so such a link may run up to ~`drift` over or under its capacity.
Transport effects (TCP slow start, loss, queueing delay) are not modelled; latency is the callers'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from dfly.sim.clock import Clock

Fairness = Literal["maxmin", "equal"]
LEVEL_EPSILON = 1e-3  # a fill moving a link's level by more than this (relative) refreshes its neighbours


class Link:
    __slots__ = ("capacity", "filled_count", "flows", "level", "name")

    def __init__(self, name: str, capacity_bytes_per_s: float) -> None:
        if not capacity_bytes_per_s > 0:
            raise ValueError(f"link {name}: capacity must be > 0, got {capacity_bytes_per_s}")
        self.name = name
        self.capacity = float(capacity_bytes_per_s)
        self.flows: dict[Flow, None] = {}
        self.level = self.capacity  # what one more flow could get here (water-filling level)
        self.filled_count = 0  # flows at the last full fill

    def __repr__(self) -> str:
        return f"Link({self.name}, {len(self.flows)} flows, level {self.level:.4g})"


FlowDone = Callable[["Flow"], None]


class Flow:
    __slots__ = (
        "active", "alloc_down", "alloc_up", "down", "due", "on_done", "rate", "remaining", "since", "size",
        "up", "version",
    )  # fmt: skip

    def __init__(self, up: Link, down: Link, size: float, on_done: FlowDone) -> None:
        self.up = up
        self.down = down
        self.size = size
        self.remaining = size
        self.rate = 0.0
        self.since = 0.0
        self.version = 0
        self.due = math.inf  # when the pending completion check runs
        self.alloc_up = up.level
        self.alloc_down = down.level
        self.on_done = on_done
        self.active = True

    def sent(self, now: float) -> float:
        """Bytes delivered so far."""
        return self.size - max(0.0, self.remaining - self.rate * (now - self.since))


class Network:
    def __init__(
        self, clock: Clock, *, fairness: Fairness = "equal", big_link: int = 32, drift: float = 0.02
    ) -> None:
        if fairness not in ("maxmin", "equal"):
            raise ValueError(f"unknown fairness {fairness!r}")
        self.clock = clock
        self.fairness = fairness
        self.equal = fairness == "equal"
        self.big_link = big_link
        self.drift = drift
        self.flows_started = 0
        self.fills = 0

    # --- public ---------------------------------------------------------------------------------------

    def start(self, up: Link, down: Link, size: float, on_done: FlowDone) -> Flow:
        """Start moving `size` bytes; `on_done(flow)` runs when the last byte has left the receiver's link."""
        flow = Flow(up, down, size, on_done)
        flow.since = self.clock.now
        up.flows[flow] = None
        down.flows[flow] = None
        self.flows_started += 1
        if size <= 0:
            self.clock.at(self.clock.now, self._finish, (flow, flow.version))
        self._changed(up, down)
        if flow.rate == 0.0:  # both ends skipped their fill (big links): run at the stored allocations
            self._set_rate(flow, min(flow.alloc_up, flow.alloc_down))
        return flow

    def cancel(self, flow: Flow) -> float:
        """Abort the flow; returns the bytes it had delivered."""
        if not flow.active:
            return flow.size - flow.remaining
        sent = flow.sent(self.clock.now)
        self._remove(flow)
        return sent

    # --- internals ------------------------------------------------------------------------------------

    def _remove(self, flow: Flow) -> None:
        flow.active = False
        flow.version += 1
        del flow.up.flows[flow]
        del flow.down.flows[flow]
        self._changed(flow.up, flow.down)

    def _finish(self, arg: tuple[Flow, int]) -> None:
        flow, version = arg
        if not flow.active or flow.version != version:
            return
        now = self.clock.now
        left = flow.remaining - flow.rate * (now - flow.since)
        if left > 1e-9 * flow.size + 1e-6:  # slowed down since this check was set: check again later
            flow.remaining, flow.since = left, now
            flow.due = now + left / flow.rate
            self.clock.at(flow.due, self._finish, (flow, version))
            return
        flow.remaining = 0.0
        self._remove(flow)
        flow.on_done(flow)

    def _changed(self, a: Link, b: Link) -> None:
        big = self.big_link
        neighbours: dict[Link, None] = {}
        for link in (a, b):
            before = link.level
            if not self._fill(link) or self.equal or len(link.flows) > big:
                continue
            if abs(link.level - before) <= LEVEL_EPSILON * before:
                continue
            for flow in link.flows:
                other = flow.down if flow.up is link else flow.up
                if other is not a and other is not b and len(other.flows) <= big:
                    neighbours[other] = None
        for link in neighbours:
            self._fill(link)

    def _fill(self, link: Link) -> bool:
        """Water-fill the link; False when skipped (a big link whose flow count barely moved)."""
        flows = link.flows
        n = len(flows)
        if n == 0:
            link.level = link.capacity
            link.filled_count = 0
            return True
        if n > self.big_link and abs(n - link.filled_count) < self.drift * link.filled_count:
            return False
        self.fills += 1
        link.filled_count = n
        capacity = link.capacity
        if self.equal:
            level = link.level = capacity / n
            for flow in flows:
                if flow.up is link:
                    flow.alloc_up = level
                else:
                    flow.alloc_down = level
                rate = min(flow.alloc_up, flow.alloc_down)
                if rate != flow.rate:
                    self._set_rate(flow, rate)
            return True
        demands = [(flow.down if flow.up is link else flow.up).level for flow in flows]
        level = capacity / n
        if min(demands) < level:  # some flows are held back elsewhere: water-fill
            demands.sort()
            rest = capacity
            left = n
            level = -1.0
            for demand in demands:
                fair = rest / left
                if demand >= fair:
                    level = fair
                    break
                rest -= demand
                left -= 1
            if level < 0:  # every flow is held back by its other end: any one could take the spare
                level = rest + demands[-1]
        link.level = level
        set_rate = self._set_rate
        for flow in flows:
            if flow.up is link:
                demand = flow.down.level
                alloc = flow.alloc_up = demand if demand < level else level
                other = flow.alloc_down
            else:
                demand = flow.up.level
                alloc = flow.alloc_down = demand if demand < level else level
                other = flow.alloc_up
            rate = alloc if alloc < other else other
            if rate != flow.rate:
                set_rate(flow, rate)
        return True

    def _set_rate(self, flow: Flow, rate: float) -> None:
        if not flow.active:
            return
        now = self.clock.now
        if flow.rate > 0.0:
            flow.remaining -= flow.rate * (now - flow.since)
            if flow.remaining < 0.0:
                flow.remaining = 0.0
        flow.since = now
        flow.rate = rate
        due = now + flow.remaining / rate
        if due < flow.due:  # sooner than the pending check: a new one (a later finish re-checks then)
            flow.due = due
            flow.version += 1
            self.clock.at(due, self._finish, (flow, flow.version))
