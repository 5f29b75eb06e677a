"""Each candidate filter on its own (table-driven), then the chain inside the engine."""

from __future__ import annotations

import pytest
from scheduler_testkit import Harness, host_info, of_type

from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.costs import PieceCosts
from dfly.scheduler.core.filters import FILTERS, FilterContext, rejection_reason
from dfly.scheduler.core.messages import SendCandidateParents
from dfly.scheduler.core.model import Host, Peer, PeerState

CHILD_HOST = Host(host_info("child"))
OTHER_HOST = Host(host_info("other"))


def child(**fields: object) -> Peer:
    return Peer("child", "t", CHILD_HOST.host_id, state=PeerState.RUNNING, **fields)  # type: ignore[arg-type]


def parent(peer_id: str = "parent", host: Host = OTHER_HOST, **fields: object) -> Peer:
    fields.setdefault("state", PeerState.RUNNING)
    fields.setdefault("finished_piece_count", 3)
    return Peer(peer_id, "t", host.host_id, **fields)  # type: ignore[arg-type]


def suspended_host() -> Host:
    host = Host(host_info("other"))
    host.disconnected = True
    return host


def unreachable_host() -> Host:
    host = Host(host_info("other"))
    host.unreachable_until = 100.0
    return host


def leech_host() -> Host:
    return Host(host_info("other", piece_port=0))  # type: ignore[arg-type]


def seed_host() -> Host:
    return Host(host_info("other", seed=True))


def slow_costs() -> PieceCosts:
    """A parent whose last served piece took 30 × its usual time."""
    costs = PieceCosts()
    for cost in (0.1, 0.1, 0.1, 3.0):
        costs.record(cost)
    assert costs.bad
    return costs


CASES = [
    # (name, child, candidate, candidate host, dag, expected reason)
    ("usable", child(), parent(), OTHER_HOST, False, None),
    ("self", child(), parent("child", host=OTHER_HOST), OTHER_HOST, False, "self"),
    ("same host", child(), parent(host=CHILD_HOST), CHILD_HOST, False, "same_host"),
    ("blocked", child(blocked={"parent"}), parent(), OTHER_HOST, False, "blocked"),
    ("pending", child(), parent(state=PeerState.PENDING), OTHER_HOST, False, "bad"),
    ("received", child(), parent(state=PeerState.RECEIVED), OTHER_HOST, False, "bad"),
    ("failed", child(), parent(state=PeerState.FAILED), OTHER_HOST, False, "bad"),
    ("left", child(), parent(state=PeerState.LEAVE), OTHER_HOST, False, "bad"),
    ("slow", child(), parent(served_costs=slow_costs()), OTHER_HOST, False, "slow"),
    ("slow seed is exempt", child(), parent(served_costs=slow_costs()), seed_host(), False, None),
    (
        "slow origin reader is exempt",
        child(),
        parent(served_costs=slow_costs(), state=PeerState.BACK_TO_SOURCE, reads_origin=True),
        OTHER_HOST,
        False,
        None,
    ),
    ("disconnected host", child(), parent(), suspended_host(), False, "suspended"),
    ("unreachable host", child(), parent(), unreachable_host(), False, "suspended"),
    ("leech", child(), parent(), leech_host(), False, "leech"),
    ("no pieces yet", child(), parent(finished_piece_count=0), OTHER_HOST, False, "unready"),
    (
        "origin reader",
        child(),
        parent(state=PeerState.BACK_TO_SOURCE, finished_piece_count=0),
        OTHER_HOST,
        False,
        None,
    ),
    (
        "succeeded",
        child(),
        parent(state=PeerState.SUCCEEDED, finished_piece_count=0),
        OTHER_HOST,
        False,
        None,
    ),
    ("seed without pieces", child(), parent(finished_piece_count=0), seed_host(), False, None),
    ("mesh allows deeper", child(children={"grandchild"}, depth=1), parent(depth=3), OTHER_HOST, False, None),
    (
        "dag refuses deeper",
        child(children={"grandchild"}, depth=1),
        parent(depth=3),
        OTHER_HOST,
        True,
        "cycle",
    ),
    (
        "dag allows shallower",
        child(children={"grandchild"}, depth=2),
        parent(depth=1),
        OTHER_HOST,
        True,
        None,
    ),
    ("dag leaf takes any", child(depth=1), parent(depth=5), OTHER_HOST, True, None),
]


@pytest.mark.parametrize(("name", "child_peer", "candidate", "host", "dag", "expected"), CASES)
def test_filter(
    name: str, child_peer: Peer, candidate: Peer, host: Host, dag: bool, expected: str | None
) -> None:
    context = FilterContext(child_peer, CHILD_HOST, now=50.0, dag=dag)
    assert rejection_reason(context, candidate, host) == expected, name


def test_unreachable_suspension_expires() -> None:
    context = FilterContext(child(), CHILD_HOST, now=100.0, dag=False)
    assert rejection_reason(context, parent(), unreachable_host()) is None


def test_every_filter_is_named() -> None:
    names = [name for name, _ in FILTERS]
    assert names == ["self", "same_host", "blocked", "bad", "slow", "suspended", "leech", "unready", "cycle"]


def test_engine_never_offers_a_peer_of_the_childs_own_host() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=2))
    harness.announce("a")
    harness.announce("b")
    harness.register("peer-a1", "a")
    harness.start_origin("peer-a1")
    assert not of_type(harness.register("peer-a2", "a"), SendCandidateParents)
    [answer] = of_type(harness.register("peer-b", "b"), SendCandidateParents)
    assert [p.peer_id for p in answer.parents] == ["peer-a1"]


def test_at_most_candidate_parent_limit_best_parents() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=10, candidate_parent_limit=2))
    for i in range(6):
        harness.announce(f"h{i}", upload_slots=10)
        harness.register(f"peer-{i}", f"h{i}")
        harness.start_origin(f"peer-{i}")
    harness.announce("child")
    [answer] = of_type(harness.register("peer-child", "child"), SendCandidateParents)
    assert len(answer.parents) == 2
