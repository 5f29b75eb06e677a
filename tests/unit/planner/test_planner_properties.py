"""Stateful property test of DownloadPlanner against a plain model of what the caller has seen.

Random schedules of add/remove parent, BITFIELD/HAVE, request, done, failed (with and without
not_available) and clock ticks; after every step the invariants hold, and at the end a parent holding
every piece (one that already exists, or a fresh one) always brings the download to complete.
"""

from __future__ import annotations

import math
import random

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dfly.daemon.core.planner import DownloadPlanner, Request

PIECES = 12
TIMEOUT = 5.0


class PlannerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.planner = DownloadPlanner(1, rng=random.Random(0))  # replaced in setup()
        self.depth = 1
        self.have: set[int] = set()
        self.announced: dict[str, set[int]] = {}  # what the planner should believe each parent holds
        self.sent: dict[Request, float] = {}  # requests in flight -> time sent
        self.now = 0.0
        self.next_parent = 0

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        have=st.sets(st.integers(0, PIECES - 1), max_size=PIECES // 2),
        depth=st.integers(1, 3),
        endgame=st.booleans(),
    )
    def setup(self, seed: int, have: set[int], depth: int, endgame: bool) -> None:
        self.planner = DownloadPlanner(
            PIECES,
            have,
            requests_per_parent=depth,
            rng=random.Random(seed),
            piece_timeout_s=TIMEOUT,
            endgame=endgame,
        )
        self.depth = depth
        self.have = set(have)

    # --- helpers ---

    def _missing(self) -> set[int]:
        return set(range(PIECES)) - self.have

    def _held_missing(self) -> set[int]:
        return set().union(*self.announced.values()) & self._missing() if self.announced else set()

    def _copies(self, piece: int) -> list[str]:
        return [r.parent_id for r in self.sent if r.piece == piece]

    def _add(self) -> str:
        parent_id = f"P{self.next_parent}"
        self.next_parent += 1
        self.planner.add_parent(parent_id)
        self.announced[parent_id] = set()
        return parent_id

    def _request(self) -> list[Request]:
        got = self.planner.next_requests(self.now)
        duplicates = False
        for r in got:
            assert r not in self.sent
            assert r.piece not in self.have, "requested a piece already had"
            assert r.piece in self.announced[r.parent_id], "requested a piece the parent did not announce"
            duplicates |= bool(self._copies(r.piece))
            self.sent[r] = self.now
        if duplicates:  # endgame only once every missing piece a parent holds is in flight
            assert self._held_missing() <= {r.piece for r in self.sent}
        return got

    def _done(self, r: Request) -> None:
        others = {Request(p, r.piece) for p in self._copies(r.piece)} - {r}
        cancels = self.planner.piece_done(r.parent_id, r.piece)
        assert {Request(c.parent_id, c.piece) for c in cancels} == others
        for other in [r, *others]:
            del self.sent[other]
        self.have.add(r.piece)

    # --- rules ---

    @precondition(lambda self: len(self.announced) < 4)
    @rule()
    def add_parent(self) -> None:
        self._add()

    @precondition(lambda self: bool(self.announced))
    @rule(data=st.data())
    def remove_parent(self, data: st.DataObject) -> None:
        parent_id = data.draw(st.sampled_from(sorted(self.announced)))
        self.planner.remove_parent(parent_id)
        del self.announced[parent_id]
        self.sent = {r: t for r, t in self.sent.items() if r.parent_id != parent_id}

    @precondition(lambda self: bool(self.announced))
    @rule(data=st.data(), everything=st.booleans())
    def announce(self, data: st.DataObject, everything: bool) -> None:
        parent_id = data.draw(st.sampled_from(sorted(self.announced)))
        pieces = set(range(PIECES)) if everything else data.draw(st.sets(st.integers(0, PIECES - 1)))
        self.planner.parent_has(parent_id, sorted(pieces))
        self.announced[parent_id] |= pieces

    @rule()
    def request(self) -> None:
        self._request()

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        self._done(data.draw(st.sampled_from(sorted(self.sent, key=repr))))

    @rule(data=st.data())
    def late_piece(self, data: st.DataObject) -> None:
        """A copy that was cancelled (or a piece from a removed parent) arrives after all."""
        if not self.have:
            return
        piece = data.draw(st.sampled_from(sorted(self.have)))
        parent_id = data.draw(st.sampled_from([*sorted(self.announced), "gone"]))
        assert self.planner.piece_done(parent_id, piece) == []

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), lacks=st.booleans())
    def failed(self, data: st.DataObject, lacks: bool) -> None:
        r = data.draw(st.sampled_from(sorted(self.sent, key=repr)))
        self.planner.piece_failed(r.parent_id, r.piece, parent_lacks=lacks)
        del self.sent[r]
        if lacks:
            self.announced[r.parent_id].discard(r.piece)

    @rule(dt=st.sampled_from([0.5, 2.0, TIMEOUT]))
    def tick(self, dt: float) -> None:
        self.now += dt
        expected = {r for r, t in self.sent.items() if self.now - t >= TIMEOUT}
        got = self.planner.expired(self.now)
        assert len(got) == len(set(got))
        assert set(got) == expected

    # --- invariants ---

    @invariant()
    def matches_model(self) -> None:
        assert self.planner.missing == len(self._missing())
        assert self.planner.complete == (not self._missing())
        assert sorted(self.planner.parents) == sorted(self.announced)
        assert set(self.planner.expired(math.inf)) == set(self.sent)
        deadline = self.planner.next_deadline()
        assert deadline == (min(self.sent.values()) + TIMEOUT if self.sent else None)

    @invariant()
    def limits(self) -> None:
        for parent_id in self.announced:
            assert sum(r.parent_id == parent_id for r in self.sent) <= self.depth
        for r in self.sent:
            assert len(self._copies(r.piece)) <= 2
            assert r.piece not in self.have

    @invariant()
    def stalled_iff_nothing_to_do(self) -> None:
        expected = bool(self._missing()) and not self.sent and not self._held_missing()
        assert self.planner.stalled() == expected

    def teardown(self) -> None:
        """Whatever happened, a parent holding every missing piece completes the download."""
        full = [p for p, pieces in self.announced.items() if self._missing() <= pieces]
        event("a remaining parent holds everything" if full else "a fresh full parent is added")
        if not full:
            parent_id = self._add()
            self.planner.parent_has(parent_id, range(PIECES))
            self.announced[parent_id] = set(range(PIECES))
        for _ in range(4 * PIECES):
            if self.planner.complete:
                break
            self._request()
            assert self.sent, "nothing in flight although a parent holds every missing piece"
            for r in sorted(self.sent, key=repr):
                if r in self.sent:
                    self._done(r)
        assert self.planner.complete
        assert not self.planner.stalled()
        assert self.planner.next_requests(self.now) == []


PlannerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestPlannerStateful = PlannerMachine.TestCase
