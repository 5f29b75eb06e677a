"""Pure download planner: for one download, which piece to request from which parent (DESIGN.md §5).

Job: from the pieces still missing and what each parent announced (BITFIELD / HAVE), decide the REQUESTs
to send, the CANCELs for endgame duplicates, which requests have timed out, and when the download is
stalled (the caller then asks the scheduler to reschedule).

Rules:
- No I/O, no clock reads (time is the ``now`` argument), randomness only from the injected
  ``random.Random``. Not thread-safe: one owner (the download's event loop) calls it.
- A piece is requested from a parent only if that parent announced it, and never once we have it.
- Requests in flight per parent: ``requests_per_parent`` with one parent; with n parents that budget is
  shared, ceil(requests_per_parent / n) each but never fewer than SHARED_DEPTH_FLOOR (one piece being sent,
  the next queued behind it). Faster parents get more pieces. Why shared: a lone parent needs the depth to
  keep its connection busy (a single 1 GiB download, 4 MiB pieces: 2 → 1.46 × curl, 6 → 1.16–1.37 ×), but
  with several parents a deep FIFO queue binds pieces to one parent long before it sends them, so the
  child's other parents run out of pieces to send it and its downlink idles behind a few busy parents
  (simulated, 2,600 hosts × 3 GB, 8 parents: p99 1.38 × the bound with 6 each, 1.28 × shared;
  docs/simulation.md).
- A parent picks, among the missing pieces it holds that are not in flight, the rarest among the known
  parents (fewest holders); ties are broken by the rng. A parent that failed a piece is not asked for it
  again while another holder has not failed it; once every holder failed it, all may retry.
- Endgame: once every missing piece is in flight, a parent with a free slot duplicates an in-flight
  piece it holds (the oldest request first; at most 2 copies); the first copy done cancels the other.
  A missing piece is otherwise in flight at most once. (Not earlier: in a swarm waiting for its source,
  "no parent has an un-requested piece" holds long before the end, and duplicates there cost the
  uplinks of parents that are the swarm's bottleneck: 8 hosts × 64 MiB, 2.7 copies wasted by peers.)
- Events for unknown (e.g. already removed) parents are ignored, except ``piece_done``: a verified piece
  is kept whoever sent it.
- Cost per event is O(holders of the pieces touched), never a scan of all pieces: each parent keeps its
  candidates in buckets by holder count, each an indexed list with O(1) add, remove and random choice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_COPIES = 2
"""At most this many copies of one piece are in flight (the second only in endgame)."""
SHARED_DEPTH_FLOOR = 2
"""With several parents, each keeps at least this many requests in flight (if requests_per_parent allows)."""


@dataclass(frozen=True, slots=True)
class Request:
    parent_id: str
    piece: int


@dataclass(frozen=True, slots=True)
class Cancel:
    parent_id: str
    piece: int


class _Bag:
    """A set of ints with O(1) add, discard and uniform random choice."""

    __slots__ = ("_index", "_items")

    def __init__(self) -> None:
        self._items: list[int] = []
        self._index: dict[int, int] = {}

    def add(self, item: int) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: int) -> None:
        i = self._index.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def choice(self, rng: random.Random) -> int:
        return rng.choice(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _Parent:
    has: set[int] = field(default_factory=set)  # missing pieces it announced
    in_flight: dict[int, float] = field(default_factory=dict)  # piece -> time requested
    buckets: dict[int, _Bag] = field(default_factory=dict)  # holder count -> pieces it may be asked for


class DownloadPlanner:
    """Piece-request policy of one download; see the module docstring for the rules."""

    def __init__(
        self,
        piece_count: int,
        have: Iterable[int] = (),
        *,
        requests_per_parent: int = 2,
        rng: random.Random,
        piece_timeout_s: float = 30.0,
        endgame: bool = True,
    ) -> None:
        if piece_count < 0:
            raise ValueError(f"piece_count must be >= 0, got {piece_count}")
        if requests_per_parent < 1:
            raise ValueError(f"requests_per_parent must be >= 1, got {requests_per_parent}")
        if not piece_timeout_s > 0:
            raise ValueError(f"piece_timeout_s must be > 0, got {piece_timeout_s}")
        self._piece_count = piece_count
        self._depth = requests_per_parent
        self._rng = rng
        self._timeout = piece_timeout_s
        self._endgame = endgame
        self._missing = set(range(piece_count))
        for piece in have:
            self._check(piece)
            self._missing.discard(piece)
        self._parents: dict[str, _Parent] = {}
        self._holders: dict[int, set[str]] = {}  # missing piece -> known parents that announced it
        self._failed: dict[int, set[str]] = {}  # missing piece -> holders that failed it
        self._copies: dict[int, dict[str, float]] = {}  # in-flight piece -> parent -> time requested
        # wanted (missing, not in flight, held) piece -> (holder count, parents whose bucket holds it)
        self._listed: dict[int, tuple[int, tuple[str, ...]]] = {}
        self._turn = 0  # which parent is served first in the next limited call

    # --- state -------------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return not self._missing

    @property
    def missing(self) -> int:
        return len(self._missing)

    @property
    def parents(self) -> list[str]:
        return list(self._parents)

    def has_room(self, parent_id: str) -> bool:
        """Whether this parent may be sent another request now (fewer than its share in flight)."""
        parent = self._parents.get(parent_id)
        return parent is not None and len(parent.in_flight) < self.depth()

    def stalled(self) -> bool:
        """Pieces missing, nothing in flight, and no known parent holds any missing piece."""
        # With nothing in flight every missing piece is wanted, and a wanted piece with a holder is listed.
        return bool(self._missing) and not self._copies and not self._listed

    # --- events ------------------------------------------------------------------------------------

    def add_parent(self, parent_id: str) -> None:
        if parent_id in self._parents:
            raise ValueError(f"parent {parent_id!r} already added")
        self._parents[parent_id] = _Parent()

    def remove_parent(self, parent_id: str) -> None:
        """Forget a parent; its in-flight pieces go back to wanted (or stay with their other copy)."""
        parent = self._parents.get(parent_id)
        if parent is None:
            return
        for piece in parent.in_flight:
            copies = self._copies[piece]
            del copies[parent_id]
            if not copies:
                del self._copies[piece]
        for piece in parent.has:
            self._holders[piece].discard(parent_id)
            failed = self._failed.get(piece)
            if failed is not None:
                failed.discard(parent_id)
        affected = parent.has | parent.in_flight.keys()
        parent.has = set()
        parent.in_flight = {}
        for piece in affected:
            self._relist(piece)
        del self._parents[parent_id]

    def parent_has(self, parent_id: str, pieces: Iterable[int]) -> None:
        """The parent announced these pieces (BITFIELD on open, then HAVE)."""
        parent = self._parents.get(parent_id)
        for piece in pieces:
            self._check(piece)
            if parent is None or piece not in self._missing or piece in parent.has:
                continue
            parent.has.add(piece)
            self._holders.setdefault(piece, set()).add(parent_id)
            self._relist(piece)

    def piece_done(self, parent_id: str, piece: int) -> list[Cancel]:
        """A verified piece arrived from this parent; returns cancels for its other in-flight copies."""
        self._check(piece)
        parent = self._parents.get(parent_id)
        if parent is not None:
            parent.in_flight.pop(piece, None)
        if piece not in self._missing:
            return []
        self._missing.discard(piece)
        cancels = []
        for other in self._copies.pop(piece, {}):
            if other != parent_id:
                del self._parents[other].in_flight[piece]
                cancels.append(Cancel(other, piece))
        self._relist(piece)
        for holder in self._holders.pop(piece, ()):
            self._parents[holder].has.discard(piece)
        self._failed.pop(piece, None)
        return cancels

    def requested_at(self, parent_id: str, piece: int) -> float | None:
        """When the request of this piece from this parent was handed out (None: not in flight)."""
        return self._copies.get(piece, {}).get(parent_id)

    def piece_lost(self, piece: int) -> None:
        """A piece we had is gone (storage could not keep it): missing again. Its holders are forgotten
        once a piece is done, so the caller announces them again with ``parent_has``."""
        self._check(piece)
        self._missing.add(piece)

    def piece_failed(self, parent_id: str, piece: int, *, parent_lacks: bool = False) -> None:
        """A request failed (error, timeout, bad digest); ``parent_lacks`` for ERROR not_available."""
        self._check(piece)
        parent = self._parents.get(parent_id)
        if parent is None:
            return
        if parent.in_flight.pop(piece, None) is not None:
            copies = self._copies[piece]
            del copies[parent_id]
            if not copies:
                del self._copies[piece]
        if piece not in self._missing:
            return
        if piece in parent.has:
            if parent_lacks:
                parent.has.discard(piece)
                self._holders[piece].discard(parent_id)
                self._failed.get(piece, set()).discard(parent_id)
            else:
                self._failed.setdefault(piece, set()).add(parent_id)
        self._relist(piece)

    # --- decisions ---------------------------------------------------------------------------------

    def next_requests(self, now: float, limit: int | None = None) -> list[Request]:
        """Fill every parent up to its share of ``requests_per_parent``, one slot per parent per round;
        at most ``limit`` requests (what the caller can give buffers to now). With a limit, each call
        starts with the next parent in turn, so scarce buffers go round the parents."""
        out: list[Request] = []
        if limit == 0:
            return out
        depth = self.depth()
        parents = list(self._parents.items())
        if parents and limit is not None:
            start = self._turn % len(parents)
            self._turn += 1
            parents = parents[start:] + parents[:start]
        progress = True
        while progress:
            progress = False
            for parent_id, parent in parents:
                if limit is not None and len(out) >= limit:
                    return out
                if len(parent.in_flight) >= depth:
                    continue
                piece = self._pick(parent)
                if piece is None and self._endgame and len(self._copies) >= len(self._missing):
                    piece = self._pick_endgame(parent_id, parent)
                if piece is None:
                    continue
                parent.in_flight[piece] = now
                self._copies.setdefault(piece, {})[parent_id] = now
                self._relist(piece)
                out.append(Request(parent_id, piece))
                progress = True
        return out

    def depth(self) -> int:
        """Requests kept in flight per parent now: the whole budget for a lone parent, else its share."""
        parents = len(self._parents)
        if parents <= 1:
            return self._depth
        return max(min(SHARED_DEPTH_FLOOR, self._depth), -(-self._depth // parents))

    def expired(self, now: float) -> list[Request]:
        """In-flight requests at least ``piece_timeout_s`` old; the caller cancels and fails them."""
        limit = now - self._timeout
        return [
            Request(parent_id, piece)
            for parent_id, parent in self._parents.items()
            for piece, sent in parent.in_flight.items()
            if sent <= limit
        ]

    def next_deadline(self) -> float | None:
        """When the oldest in-flight request expires, or None when nothing is in flight."""
        oldest = min((min(copies.values()) for copies in self._copies.values()), default=math.inf)
        return None if oldest == math.inf else oldest + self._timeout

    # --- internals ---------------------------------------------------------------------------------

    def _check(self, piece: int) -> None:
        if not 0 <= piece < self._piece_count:
            raise ValueError(f"piece {piece} out of range [0, {self._piece_count})")

    def _eligible(self, piece: int) -> tuple[str, ...]:
        holders = self._holders.get(piece, ())
        failed = self._failed.get(piece, ())
        return tuple(h for h in holders if h not in failed) or tuple(holders)

    def _relist(self, piece: int) -> None:
        """Put a piece in the buckets of the parents that may be asked for it now, and only those."""
        old = self._listed.pop(piece, None)
        if old is not None:
            count, listed_at = old
            for parent_id in listed_at:
                buckets = self._parents[parent_id].buckets
                buckets[count].discard(piece)
                if not buckets[count]:
                    del buckets[count]
        if piece in self._copies or piece not in self._missing:
            return
        eligible = self._eligible(piece)
        if not eligible:
            return
        count = len(self._holders[piece])
        for parent_id in eligible:
            bag = self._parents[parent_id].buckets.get(count)
            if bag is None:
                bag = self._parents[parent_id].buckets[count] = _Bag()
            bag.add(piece)
        self._listed[piece] = (count, eligible)

    def _pick(self, parent: _Parent) -> int | None:
        if not parent.buckets:
            return None
        return parent.buckets[min(parent.buckets)].choice(self._rng)

    def _pick_endgame(self, parent_id: str, parent: _Parent) -> int | None:
        best: tuple[float, int] | None = None
        for piece, copies in self._copies.items():
            if len(copies) >= MAX_COPIES or parent_id in copies or piece not in parent.has:
                continue
            if parent_id not in self._eligible(piece):
                continue
            key = (min(copies.values()), piece)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]
