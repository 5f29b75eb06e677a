"""DownloadPlanner calls one by one: argument checks, the rng's tie-break, lost pieces, room per parent."""

from __future__ import annotations

import random
from typing import Any

import pytest

from dfly.daemon.core.planner import DownloadPlanner, Request


@pytest.mark.parametrize(
    "kwargs",
    [
        {"piece_count": -1},
        {"piece_count": 1, "requests_per_parent": 0},
        {"piece_count": 1, "piece_timeout_s": 0},
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        DownloadPlanner(rng=random.Random(0), **kwargs)


def test_out_of_range_piece_and_duplicate_parent() -> None:
    planner = DownloadPlanner(4, rng=random.Random(0))
    planner.add_parent("A")
    with pytest.raises(ValueError, match="already added"):
        planner.add_parent("A")
    with pytest.raises(ValueError, match="out of range"):
        planner.parent_has("A", [4])
    with pytest.raises(ValueError, match="out of range"):
        planner.piece_done("A", -1)
    with pytest.raises(ValueError, match="out of range"):
        DownloadPlanner(4, have=[7], rng=random.Random(0))


def test_ties_are_broken_by_the_rng() -> None:
    def first_requests(seed: int) -> list[Request]:
        planner = DownloadPlanner(64, rng=random.Random(seed))
        planner.add_parent("A")
        planner.parent_has("A", range(64))
        return planner.next_requests(0.0)

    assert first_requests(1) == first_requests(1)
    assert len({tuple(first_requests(seed)) for seed in range(10)}) > 1


def test_a_lost_piece_is_wanted_again_from_holders_announced_again() -> None:
    planner = DownloadPlanner(2, rng=random.Random(1), requests_per_parent=2)
    planner.add_parent("A")
    planner.parent_has("A", [0, 1])
    assert set(planner.next_requests(0.0)) == {Request("A", 0), Request("A", 1)}
    planner.piece_done("A", 0)
    planner.piece_done("A", 1)
    assert planner.complete
    planner.piece_lost(1)
    assert planner.missing == 1
    assert not planner.complete
    assert planner.next_requests(1.0) == []  # its holders were forgotten when it was done
    planner.parent_has("A", [0, 1])  # the caller announces them again
    assert planner.next_requests(1.0) == [Request("A", 1)]  # never the piece still held
    planner.piece_done("A", 1)
    assert planner.complete


def test_a_parent_without_room_gets_no_request_from_its_have() -> None:
    """The daemon skips a planner step for a HAVE from a parent without room (parents.on_have)."""
    planner = DownloadPlanner(8, rng=random.Random(1), requests_per_parent=2)
    planner.add_parent("A")
    assert planner.has_room("A")
    assert not planner.has_room("unknown")
    planner.parent_has("A", [0, 1])
    assert len(planner.next_requests(0.0)) == 2
    assert not planner.has_room("A")
    planner.parent_has("A", [2, 3])
    assert planner.next_requests(0.0) == []  # what skipping the step loses: nothing
    planner.piece_done("A", 0)
    assert planner.has_room("A")
    assert len(planner.next_requests(0.0)) == 1


def test_a_limit_caps_the_requests_and_the_parents_take_turns() -> None:
    """The daemon asks for no more requests than its buffer pool can take now; the scarce ones go round
    the parents instead of always to the first."""
    planner = DownloadPlanner(8, requests_per_parent=4, rng=random.Random(0))
    for parent in ("A", "B"):
        planner.add_parent(parent)
        planner.parent_has(parent, range(8))
    assert planner.next_requests(0.0, limit=0) == []
    firsts = []
    for _ in range(4):
        (request,) = planner.next_requests(0.0, limit=1)
        firsts.append(request.parent_id)
    assert firsts == ["A", "B", "A", "B"]
    assert len(planner.next_requests(0.0)) == 0  # each parent now holds its share (2 of 4)
