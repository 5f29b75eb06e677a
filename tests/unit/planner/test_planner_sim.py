"""Small simulations driving DownloadPlanner: parent speeds, endgame tail, piece order, cost per event.

The simulated parent serves its queued requests in order, one at a time, each taking its mean service
time ±30 %;
CANCEL drops a queued request, a piece already being sent completes (as in the piece protocol).
"""

from __future__ import annotations

import heapq
import random
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from dfly.daemon.core.planner import DownloadPlanner


@dataclass
class SimResult:
    finish: float
    served: Counter[str] = field(default_factory=Counter)  # pieces that counted, per parent
    wasted: int = 0  # endgame copies that arrived after the piece was done


def simulate(piece_count: int, service: dict[str, float], *, endgame: bool, seed: int) -> SimResult:
    planner = DownloadPlanner(piece_count, rng=random.Random(seed), endgame=endgame)
    jitter = random.Random(seed + 1_000_000)  # the same link behaviour with and without endgame
    queued: dict[str, deque[int]] = {p: deque() for p in service}
    busy: dict[str, bool] = dict.fromkeys(service, False)
    heap: list[tuple[float, int, str, int]] = []
    seq = 0
    now = 0.0
    result = SimResult(finish=0.0)
    for parent_id in service:
        planner.add_parent(parent_id)
        planner.parent_has(parent_id, range(piece_count))

    def serve(parent_id: str) -> None:
        nonlocal seq
        if not busy[parent_id] and queued[parent_id]:
            busy[parent_id] = True
            seq += 1
            took = service[parent_id] * jitter.uniform(0.7, 1.3)
            heapq.heappush(heap, (now + took, seq, parent_id, queued[parent_id].popleft()))

    def issue() -> None:
        for r in planner.next_requests(now):
            queued[r.parent_id].append(r.piece)
            serve(r.parent_id)

    issue()
    while not planner.complete:
        now, _, parent_id, piece = heapq.heappop(heap)
        busy[parent_id] = False
        before = planner.missing
        for cancel in planner.piece_done(parent_id, piece):
            if cancel.piece in queued[cancel.parent_id]:
                queued[cancel.parent_id].remove(cancel.piece)
        if planner.missing < before:
            result.served[parent_id] += 1
        else:
            result.wasted += 1
        serve(parent_id)
        issue()
    result.finish = now
    return result


SPEEDS = {"fast": 1.0, "medium": 2.0, "slow": 8.0}  # seconds per piece


def test_faster_parents_serve_more_and_endgame_shortens_the_tail() -> None:
    with_endgame = [simulate(120, SPEEDS, endgame=True, seed=s) for s in range(20)]
    without = [simulate(120, SPEEDS, endgame=False, seed=s) for s in range(20)]

    for res in [*with_endgame, *without]:
        assert res.served["fast"] > res.served["medium"] > res.served["slow"] > 0
        assert sum(res.served.values()) == 120
    # Ideal: 120 pieces at 1 + 1/2 + 1/8 pieces/s = 73.8 s. Without endgame the last pieces wait in the
    # slow parent's queue (up to 2 x 8 s); with it the fast parent duplicates them.
    mean_with = statistics.mean(r.finish for r in with_endgame)
    mean_without = statistics.mean(r.finish for r in without)
    assert mean_with < 78.0
    assert mean_without - mean_with > 4.0, (mean_with, mean_without)
    assert sum(a.finish <= b.finish for a, b in zip(with_endgame, without, strict=True)) >= 18
    # The price: a few duplicate pieces at the very end, never more than the in-flight window.
    assert max(r.wasted for r in with_endgame) <= 2 * len(SPEEDS)
    assert all(r.wasted == 0 for r in without)


def test_single_parent_order_is_random_so_children_diverge() -> None:
    """The twist of rarest-first: with one parent (the seed) every count ties, and the order is random.

    Measured: two children each halfway through from the same seed share ~1/4 of the pieces (sequential
    order would make them share all of them), so each holds ~n/4 pieces the other can fetch from it
    instead of from the seed. The price is for in-order readers: halfway, the contiguous prefix a
    streaming consumer could read is a handful of pieces, not n/2.
    """
    n = 1024

    def first_half(seed: int) -> list[int]:
        planner = DownloadPlanner(n, rng=random.Random(seed))
        planner.add_parent("seed")
        planner.parent_has("seed", range(n))
        got: list[int] = []
        while len(got) < n // 2:
            for r in planner.next_requests(0.0):
                planner.piece_done(r.parent_id, r.piece)
                got.append(r.piece)
        return got[: n // 2]

    a, b = set(first_half(1)), set(first_half(2))
    overlap = len(a & b) / (n // 2)
    assert 0.4 < overlap < 0.6, overlap  # ~0.5 of each half: ~n/4 pieces to trade both ways
    prefix = next(i for i in range(n) if i not in a)
    assert prefix < 16, prefix


def test_rarest_first_asks_the_seed_only_for_what_no_peer_parent_has() -> None:
    """A child with the seed and a half-done peer as parents: the peer's pieces come from the peer."""
    n = 256
    planner = DownloadPlanner(n, rng=random.Random(7), requests_per_parent=2)
    planner.add_parent("seed")
    planner.add_parent("peer")
    planner.parent_has("seed", range(n))
    planner.parent_has("peer", range(0, n, 2))
    from_seed: set[int] = set()
    while not planner.complete:
        requests = planner.next_requests(0.0)
        for r in requests:
            if r.parent_id == "seed":
                from_seed.add(r.piece)
            planner.piece_done(r.parent_id, r.piece)
    # The seed serves odd pieces (count 1) before any even one; equal speeds → the peer serves all evens
    # except those the seed took once the odd pieces ran out.
    assert len([p for p in from_seed if p % 2]) == n // 2
    assert len([p for p in from_seed if not p % 2]) <= 4


def test_full_download_of_4096_pieces_from_3_parents_is_fast() -> None:
    n = 4096
    rng = random.Random(3)
    start = time.thread_time()
    planner = DownloadPlanner(n, rng=random.Random(1), requests_per_parent=4)
    for parent_id in ("a", "b", "c"):
        planner.add_parent(parent_id)
    # Bitfields of half the pieces, then the rest by HAVE as the download goes.
    for parent_id in ("a", "b", "c"):
        planner.parent_has(parent_id, [p for p in range(n) if rng.random() < 0.5])
    have_later = list(range(n))
    rng.shuffle(have_later)
    in_flight: list[tuple[str, int]] = []
    now = 0.0
    while not planner.complete:
        for _ in range(8):
            if have_later:
                planner.parent_has(rng.choice("abc"), [have_later.pop()])
        in_flight.extend((r.parent_id, r.piece) for r in planner.next_requests(now))
        for _ in range(3):
            if not in_flight:
                break
            parent_id, piece = in_flight.pop(rng.randrange(len(in_flight)))
            if rng.random() < 0.02:
                planner.piece_failed(parent_id, piece)
            else:
                for cancel in planner.piece_done(parent_id, piece):
                    in_flight.remove((cancel.parent_id, cancel.piece))
        now += 0.01
        planner.expired(now)
        planner.next_deadline()
        planner.stalled()
    elapsed = time.thread_time() - start
    assert elapsed < 1.0, elapsed
