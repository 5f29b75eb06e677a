"""Table-driven checks of DownloadPlanner choices: each case is a list of steps with expected outputs.

Expected requests are sets, and every case runs under many rng seeds, so a case only passes when the
outcome does not depend on the random tie-break.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from dfly.daemon.core.planner import Cancel, DownloadPlanner, Request

Step = tuple[Any, ...]
R = Request
C = Cancel

CASES: dict[str, tuple[dict[str, Any], list[Step]]] = {
    "only announced pieces are requested": (
        {"piece_count": 4},
        [("add", "A"), ("has", "A", [1, 3]), ("next", 0.0, {R("A", 1), R("A", 3)}), ("next", 0.0, set())],
    ),
    "pieces already had are never requested": (
        {"piece_count": 3, "have": [0, 2]},
        [("add", "A"), ("has", "A", [0, 1, 2]), ("next", 0.0, {R("A", 1)}), ("missing", 1)],
    ),
    "queue depth per parent": (
        {"piece_count": 10, "requests_per_parent": 3},
        [
            ("add", "A"),
            ("has", "A", range(10)),
            ("next_count", 0.0, {"A": 3}),
            ("next", 0.0, set()),
            ("done_any", "A"),
            ("next_count", 0.0, {"A": 1}),
        ],
    ),
    "the depth is shared among parents, never below two each": (
        {"piece_count": 40, "requests_per_parent": 6},
        [
            ("add", "A"),
            ("has", "A", range(40)),
            ("next_count", 0.0, {"A": 6}),  # a lone parent gets the whole budget
            ("add", "B"),
            ("add", "C"),
            ("has", "B", range(40)),
            ("has", "C", range(40)),
            ("next_count", 0.0, {"B": 2, "C": 2}),  # ceil(6 / 3); A keeps its 6 until they drain
            ("add", "D"),
            ("add", "E"),
            ("has", "D", range(40)),
            ("has", "E", range(40)),
            ("next_count", 0.0, {"D": 2, "E": 2}),  # ceil(6 / 5) = 2: the floor
            ("remove", "A"),
            ("remove", "B"),
            ("remove", "C"),
            ("remove", "D"),
            ("next_count", 0.0, {"E": 4}),  # a lone parent again
        ],
    ),
    "a shared depth never exceeds requests_per_parent": (
        {"piece_count": 10, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", range(10)),
            ("has", "B", range(10)),
            ("next_count", 0.0, {"A": 1, "B": 1}),
        ],
    ),
    "rarest first: a parent serves the pieces only it holds": (
        {"piece_count": 4},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0, 1, 2, 3]),
            ("has", "B", [0, 1]),
            ("next", 0.0, {R("A", 2), R("A", 3), R("B", 0), R("B", 1)}),
        ],
    ),
    "rarest first follows HAVE updates": (
        {"piece_count": 3, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "B", [0, 1, 2]),
            ("has", "A", [0, 1]),  # piece 2: only B
            ("next", 0.0, {R("A", 0), R("A", 1), R("B", 2)}, "A"),  # A's choice is random between 0 and 1
        ],
    ),
    "failed parent is not asked again while another holder has not failed": (
        {"piece_count": 1, "requests_per_parent": 1, "endgame": False},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("next", 0.0, {R("A", 0)}),
            ("fail", "A", 0),
            ("next", 0.0, {R("B", 0)}),
            ("fail", "B", 0),  # every holder failed: all may retry
            ("next", 0.0, {R("A", 0)}),
        ],
    ),
    "failed parent is skipped in endgame too": (
        {"piece_count": 1, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("next", 0.0, {R("A", 0), R("B", 0)}),  # endgame duplicate
            ("fail", "A", 0),
            ("next", 0.0, set()),
        ],
    ),
    "not_available: the parent is no longer assumed to hold the piece": (
        {"piece_count": 1, "requests_per_parent": 1, "endgame": False},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("next", 0.0, {R("A", 0)}),
            ("lacks", "A", 0),
            ("next", 0.0, {R("B", 0)}),
            ("fail", "B", 0),  # B is the only holder left: it retries, A is never asked
            ("next", 0.0, {R("B", 0)}),
            ("lacks", "B", 0),
            ("next", 0.0, set()),
            ("stalled", True),
            ("has", "A", [0]),  # a later HAVE restores it
            ("stalled", False),
            ("next", 0.0, {R("A", 0)}),
        ],
    ),
    "remove_parent requeues its in-flight pieces": (
        {"piece_count": 4},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0, 1]),
            ("has", "B", [0, 1, 2, 3]),
            ("next", 0.0, {R("A", 0), R("A", 1), R("B", 2), R("B", 3)}),
            ("remove", "A"),
            ("parents", ["B"]),
            ("next", 0.0, set()),
            ("done", "B", 2, []),
            ("done", "B", 3, []),
            ("next", 1.0, {R("B", 0), R("B", 1)}),
        ],
    ),
    "endgame duplicates in-flight pieces and done cancels the other copy": (
        {"piece_count": 2},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0, 1]),
            ("has", "B", [0, 1]),
            ("next", 0.0, {R("A", 0), R("A", 1), R("B", 0), R("B", 1)}),
            ("done", "A", 0, [C("B", 0)]),
            ("next", 0.0, set()),  # piece 1 already has two copies
            ("done", "B", 1, [C("A", 1)]),
            ("done", "A", 1, []),  # the cancelled copy arrived anyway
            ("complete", True),
        ],
    ),
    "endgame duplicates the oldest request first": (
        {"piece_count": 2, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("add", "C"),
            ("has", "A", [0]),
            ("has", "B", [1]),
            ("next", 5.0, {R("A", 0), R("B", 1)}),
            ("fail", "A", 0),
            ("next", 7.0, {R("A", 0)}),  # the only holder retries
            ("has", "C", [0, 1]),
            ("next", 8.0, {R("C", 1)}),  # B's piece 1 was requested at 5.0, A's piece 0 at 7.0
            ("done", "C", 1, [C("B", 1)]),
        ],
    ),
    "no endgame while a parent still has un-requested pieces": (
        {"piece_count": 2, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0, 1]),
            ("next", 0.0, {R("A", 0), R("A", 1)}, "A"),  # A gets one of them
            ("has", "B", [0, 1]),
            ("next_count", 0.0, {"B": 1}),  # the other, not a duplicate
            ("pieces_in_flight", 2),
        ],
    ),
    "endgame: at most two copies of a piece": (
        {"piece_count": 1, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("add", "C"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("has", "C", [0]),
            ("next", 0.0, {R("A", 0), R("B", 0)}),
            ("next", 0.0, set()),
            ("done", "B", 0, [C("A", 0)]),
        ],
    ),
    "no endgame for an idle parent while another parent's pieces wait": (
        {"piece_count": 2, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("next", 0.0, {R("A", 0)}),
            ("has", "A", [1]),
            ("has", "B", [0]),
            ("next", 0.0, set()),  # B could duplicate 0, but piece 1 (A's) is not in flight yet
        ],
    ),
    "no endgame while a missing piece is held by nobody yet (the swarm is waiting for its source)": (
        {"piece_count": 3, "requests_per_parent": 1},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("next", 0.0, {R("A", 0)}),  # B does not duplicate 0: pieces 1 and 2 are not in flight
            ("has", "A", [1]),
            ("next", 0.0, set()),  # A is busy; B still may not duplicate 0 (piece 2 is held by nobody)
            ("has", "B", [2]),
            ("next", 0.0, {R("B", 2)}),
        ],
    ),
    "not_available clears the parent's failure record": (
        {"piece_count": 1, "requests_per_parent": 1, "endgame": False},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("next", 0.0, {R("A", 0)}),
            ("fail", "A", 0),
            ("next", 0.0, {R("B", 0)}),
            ("lacks", "B", 0),
            ("next", 0.0, {R("A", 0)}),
            ("lacks", "A", 0),
            ("has", "B", [0]),
            ("has", "A", [0]),
            ("next", 0.0, {R("A", 0)}),  # A's old failure is forgotten: A (first in order) is asked
        ],
    ),
    "a parent removed and added again starts with a clean record": (
        {"piece_count": 1, "requests_per_parent": 1, "endgame": False},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0]),
            ("has", "B", [0]),
            ("next", 0.0, {R("A", 0)}),
            ("fail", "A", 0),
            ("remove", "A"),
            ("add", "A"),
            ("has", "A", [0]),
            ("next", 0.0, {R("B", 0)}),
            ("fail", "B", 0),
            ("next", 0.0, {R("A", 0)}),  # B failed it, the new A did not
        ],
    ),
    "endgame disabled": (
        {"piece_count": 2, "endgame": False},
        [
            ("add", "A"),
            ("add", "B"),
            ("has", "A", [0, 1]),
            ("has", "B", [0, 1]),
            ("next_count", 0.0, {"A": 1, "B": 1}),
            ("next", 0.0, set()),
        ],
    ),
    "expired requests and deadlines": (
        {"piece_count": 2, "requests_per_parent": 1, "piece_timeout_s": 30.0},
        [
            ("add", "A"),
            ("has", "A", [0]),
            ("deadline", None),
            ("next", 10.0, {R("A", 0)}),
            ("deadline", 40.0),
            ("expired", 39.9, []),
            ("expired", 40.0, [R("A", 0)]),
            ("expired", 41.0, [R("A", 0)]),  # a query: stays until the caller fails it
            ("fail", "A", 0),
            ("deadline", None),
            ("expired", 99.0, []),
            ("next", 50.0, {R("A", 0)}),  # the only holder retries
            ("deadline", 80.0),
        ],
    ),
    "stalled: missing pieces and no parent holding any": (
        {"piece_count": 2, "have": [0]},
        [
            ("stalled", True),
            ("add", "A"),
            ("stalled", True),
            ("has", "A", [0]),  # a piece we have does not help
            ("stalled", True),
            ("has", "A", [1]),
            ("stalled", False),
            ("next", 0.0, {R("A", 1)}),
            ("remove", "A"),
            ("stalled", True),
            ("parents", []),
        ],
    ),
    "events of removed parents are ignored, a piece they sent is kept": (
        {"piece_count": 2},
        [
            ("add", "A"),
            ("has", "A", [0, 1]),
            ("next", 0.0, {R("A", 0), R("A", 1)}),
            ("remove", "A"),
            ("fail", "A", 0),
            ("has", "A", [0]),
            ("done", "A", 1, []),
            ("missing", 1),
            ("stalled", True),
        ],
    ),
}


def run(kwargs: dict[str, Any], steps: list[Step], seed: int) -> None:
    planner = DownloadPlanner(rng=random.Random(seed), **kwargs)
    for i, step in enumerate(steps):
        op, *args = step
        where = f"step {i} {step!r}"
        if op == "add":
            planner.add_parent(args[0])
        elif op == "remove":
            planner.remove_parent(args[0])
        elif op == "has":
            planner.parent_has(args[0], args[1])
        elif op == "next":
            got = planner.next_requests(args[0])
            assert len(got) == len(set(got)), where
            if len(args) == 3:  # only this parent's requests are a choice among the expected ones
                chosen = {r for r in got if r.parent_id == args[2]}
                assert len(chosen) == 1, where
                assert set(got) - chosen <= args[1], where
                assert chosen <= args[1], where
            else:
                assert set(got) == args[1], where
        elif op == "next_count":
            got = planner.next_requests(args[0])
            counts = {p: sum(r.parent_id == p for r in got) for p in {r.parent_id for r in got}}
            assert counts == args[1], where
            assert len({r.piece for r in got}) == len(got), where
        elif op == "done":
            assert planner.piece_done(args[0], args[1]) == args[2], where
        elif op == "done_any":
            piece = next(r.piece for r in planner.expired(float("inf")) if r.parent_id == args[0])
            planner.piece_done(args[0], piece)
        elif op == "fail":
            planner.piece_failed(args[0], args[1])
        elif op == "lacks":
            planner.piece_failed(args[0], args[1], parent_lacks=True)
        elif op == "expired":
            assert planner.expired(args[0]) == args[1], where
        elif op == "deadline":
            assert planner.next_deadline() == args[0], where
        elif op == "pieces_in_flight":
            assert len({r.piece for r in planner.expired(float("inf"))}) == args[0], where
        elif op == "stalled":
            assert planner.stalled() is args[0], where
        elif op == "missing":
            assert planner.missing == args[0], where
        elif op == "complete":
            assert planner.complete is args[0], where
        elif op == "parents":
            assert planner.parents == args[0], where
        else:
            raise AssertionError(f"unknown op {op!r}")


@pytest.mark.parametrize("name", list(CASES))
def test_planner_choice(name: str) -> None:
    kwargs, steps = CASES[name]
    for seed in range(25):
        run(kwargs, steps, seed)
