"""Finish verdicts: a child's digests against the digests the origin reader published."""

from __future__ import annotations

import pytest
from scheduler_testkit import Harness, of_type

from dfly.scheduler.core.messages import PeerFinished, PeerLeft, SendFinishVerdict
from dfly.scheduler.core.verdicts import Verdict, judge


@pytest.mark.parametrize(
    ("digests", "published", "expected_count", "readers_running", "verdict"),
    [
        ((1, 2, 3), {0: 1, 1: 2, 2: 3}, 3, True, Verdict(True)),
        ((1, 9, 3), {0: 1, 1: 2, 2: 3}, 3, True, Verdict(False, (1,))),
        ((1, 9, 3), {0: 1, 1: 2}, 3, True, Verdict(False, (1,))),  # a mismatch needs no waiting
        ((1, 2, 3), {0: 1, 1: 2}, 3, True, None),  # missing digest, reader running: wait
        ((1, 2, 3), {0: 1, 1: 2}, 3, False, Verdict(True)),  # reader gone: decide on what is known
        ((1, 2), {0: 1, 1: 2, 2: 3}, 3, False, Verdict(False, (2,))),  # the child lacks a piece
        ((), {}, None, False, Verdict(True)),
    ],
)
def test_judge(
    digests: tuple[int, ...],
    published: dict[int, int],
    expected_count: int | None,
    readers_running: bool,
    verdict: Verdict | None,
) -> None:
    assert judge(digests, published, expected_count, readers_running) == verdict


def started(harness: Harness) -> None:
    for name in ("a", "b"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a", content_length=3072, piece_length=1024)  # 3 pieces
    harness.register("peer-b", "b")


def test_mismatch_is_rejected_with_the_bad_pieces(harness: Harness) -> None:
    started(harness)
    harness.pieces("peer-a", 0, 1, 2)  # digests 100, 101, 102
    commands = harness.do(PeerFinished("peer-b", (100, 999, 102)))
    assert commands == [SendFinishVerdict("peer-b", accepted=False, bad_pieces=(1,))]
    commands = harness.do(PeerFinished("peer-b", (100, 101, 102)))  # refetched
    assert commands == [SendFinishVerdict("peer-b", accepted=True)]


def test_verdict_waits_for_missing_digests_then_follows_the_event(harness: Harness) -> None:
    started(harness)
    harness.pieces("peer-a", 0, 1)
    assert harness.do(PeerFinished("peer-b", (100, 101, 102))) == []
    assert (
        harness.engine.scheduler.next_deadline() is None
    )  # no retry armed  # no timer: the digests' arrival decides
    commands = harness.pieces("peer-a", 2)
    assert of_type(commands, SendFinishVerdict) == [SendFinishVerdict("peer-b", accepted=True)]
    view = harness.engine.stat_task("task-1")
    assert view is not None
    assert view.state == "SUCCEEDED"
    assert view.piece_digests == (100, 101, 102)


def test_deferred_verdict_is_accepted_once_the_origin_reader_is_gone(harness: Harness) -> None:
    started(harness)
    harness.pieces("peer-a", 0)
    assert harness.do(PeerFinished("peer-b", (100, 101, 102))) == []
    commands = harness.do(PeerLeft("peer-a"))
    assert of_type(commands, SendFinishVerdict) == [SendFinishVerdict("peer-b", accepted=True)]


def test_the_origin_readers_own_finish_is_accepted_at_once_and_publishes(harness: Harness) -> None:
    started(harness)
    assert harness.do(PeerFinished("peer-b", (100, 101, 102))) == []
    commands = harness.do(PeerFinished("peer-a", (100, 101, 102)))
    assert commands == [
        SendFinishVerdict("peer-a", accepted=True),
        SendFinishVerdict("peer-b", accepted=True),
    ]
