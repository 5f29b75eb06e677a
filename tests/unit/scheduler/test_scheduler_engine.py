"""Engine behaviour on a virtual clock: seed trigger, event-driven scheduling, retries, origin errors."""

from __future__ import annotations

import pytest
from scheduler_testkit import Harness, of_type, swarm_with_seed

from dfly.common.pieces import MiB
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.messages import (
    ClosePeer,
    FinishedPiece,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PiecesFinished,
    SeedTriggerFailed,
    SendBackToSource,
    SendCandidateParents,
    SendTaskFailed,
    SourceErrorInfo,
    TriggerSeedPeer,
)
from dfly.scheduler.core.scheduling import pick_seed_host


def test_first_register_triggers_the_seed_and_seed_reads_origin(harness: Harness) -> None:
    swarm_with_seed(harness)
    commands = harness.register("peer-a", "a")
    [trigger] = of_type(commands, TriggerSeedPeer)
    assert trigger.seed_host_id == harness.host_id("seed")
    assert trigger.download.need_back_to_source
    assert trigger.download.url == "http://origin/file"
    assert not of_type(harness.register("peer-b", "b"), TriggerSeedPeer)  # one trigger per task

    seed_commands = harness.register("seed-peer", "seed", need_back_to_source=True)
    assert of_type(seed_commands, SendBackToSource)[0].peer_id == "seed-peer"


def test_waiting_peers_get_the_seed_on_its_back_to_source_started_without_a_timer(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.register("peer-a", "a")
    harness.register("peer-b", "b")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    commands = harness.start_origin("seed-peer")  # same instant: no timer fired
    answers = {command.peer_id: command for command in of_type(commands, SendCandidateParents)}
    assert set(answers) == {"peer-a", "peer-b"}
    for answer in answers.values():
        assert [parent.peer_id for parent in answer.parents] == ["seed-peer"]
        assert answer.parents[0].seed
        assert (answer.layout.content_length, answer.layout.piece_length) == (4 * 1024 * 1024, 1024 * 1024)
    assert harness.engine.scheduler.next_deadline() is None  # no retry armed


def test_first_pieces_of_a_peer_make_it_a_parent(harness: Harness) -> None:
    for name in ("a", "b", "c", "d"):
        harness.announce(name)
    assert of_type(harness.register("peer-a", "a"), SendBackToSource)  # no seed: first peer reads origin
    harness.start_origin("peer-a")
    assert of_type(harness.register("peer-b", "b"), SendCandidateParents)
    assert not of_type(harness.do(PeerLeft("peer-a")), SendBackToSource)  # it may come back...
    commands = harness.advance(EngineConfig().source_return_s)  # ...it did not: b takes over its read
    assert [c.peer_id for c in of_type(commands, SendBackToSource)] == ["peer-b"]
    harness.start_origin("peer-b")
    [answer] = of_type(harness.register("peer-c", "c"), SendCandidateParents)  # the new origin reader
    assert [p.peer_id for p in answer.parents] == ["peer-b"]
    [answer] = of_type(harness.register("peer-d", "d"), SendCandidateParents)  # c has nothing yet
    assert [p.peer_id for p in answer.parents] == ["peer-b"]
    commands = harness.pieces("peer-c", 0, parent="peer-b")  # c's first pieces make it a parent
    [pushed] = of_type(commands, SendCandidateParents)
    assert pushed.peer_id == "peer-d"
    assert [p.peer_id for p in pushed.parents] == ["peer-c"]


def test_unready_peer_becomes_parent_on_first_pieces() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=1))
    for name in ("a", "b", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a")
    harness.register("peer-b", "b")  # gets peer-a
    harness.do(PeerFailed("peer-a", "disk full"))  # origin reader gone, b has nothing yet
    commands = harness.register("peer-c", "c", disable_back_to_source=True)
    assert not of_type(commands, SendCandidateParents)  # b is unready
    commands = harness.pieces("peer-b", 0, parent="peer-a")
    [answer] = of_type(commands, SendCandidateParents)
    assert answer.peer_id == "peer-c"
    assert [p.peer_id for p in answer.parents] == ["peer-b"]


def test_retries_then_back_to_source_then_failure_on_the_virtual_clock() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=1, source_start_timeout_s=0))
    harness.announce("seed", seed=True)
    harness.announce("a")
    harness.announce("b")
    harness.register("peer-a", "a")  # seed triggered, never registers
    assert harness.engine.next_deadline() == pytest.approx(0.5)
    assert not harness.advance(1.49)  # tries 2 and 3 at 0.5 s and 1.0 s
    commands = harness.advance(0.01)  # 4th try at 1.5 s
    [to_origin] = of_type(commands, SendBackToSource)
    assert to_origin.peer_id == "peer-a"
    assert "4 attempts" in to_origin.description

    harness.register("peer-b", "b")  # the origin slot is taken and peer-a has not started
    assert not harness.advance(1.5)
    [failed] = of_type(harness.advance(0.5), SendTaskFailed)
    assert failed.peer_id == "peer-b"
    assert "no parent available" in failed.description
    assert failed.source_error is None
    view = harness.engine.stat_task("task-1")
    assert view is not None
    assert view.peer_count == 1


def test_disable_back_to_source_fails_after_retry_limit_without_origin() -> None:
    harness = Harness(EngineConfig(source_start_timeout_s=0))
    harness.announce("a")
    harness.announce("b")
    harness.register("peer-a", "a")
    commands = harness.register("peer-b", "b", disable_back_to_source=True)
    assert not commands
    later = harness.advance(10)
    assert not of_type(later, SendBackToSource)
    [failed] = of_type(later, SendTaskFailed)
    assert failed.peer_id == "peer-b"
    assert harness.now == 10


def test_consistent_hash_picks_the_same_seed_and_survives_removing_another() -> None:
    harness = Harness()
    names = [f"seed-{i}" for i in range(5)]
    for name in names:
        harness.announce(name, seed=True)
    hosts = [harness.engine.cluster.hosts[harness.host_id(name)] for name in names]
    for task_id in (f"task-{i}" for i in range(20)):
        chosen = pick_seed_host(task_id, hosts)
        assert chosen is not None
        assert pick_seed_host(task_id, list(reversed(hosts))) is chosen
        others = [host for host in hosts if host is not chosen]
        smaller = [host for host in hosts if host is not others[0]]
        assert pick_seed_host(task_id, smaller) is chosen


def test_seed_failure_is_remembered_and_one_waiting_peer_reads_the_origin(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.announce("c")
    [trigger] = of_type(harness.register("peer-a", "a"), TriggerSeedPeer)
    harness.register("peer-b", "b")
    commands = harness.do(SeedTriggerFailed("task-1", trigger.seed_host_id, "connection refused"))
    to_origin = of_type(commands, SendBackToSource)
    assert [command.peer_id for command in to_origin] == ["peer-a"]  # exactly one

    harness.advance(60)
    harness.do(PeerLeft("peer-a"))
    harness.do(PeerLeft("peer-b"))
    commands = harness.register("peer-c", "c")  # 60 s later: the seed is not tried again
    assert not of_type(commands, TriggerSeedPeer)
    assert of_type(commands, SendBackToSource)

    harness.do(PeerLeft("peer-c"))
    assert "task-1" in harness.engine.cluster.tasks  # no peer, kept only for the seed's failure
    harness.advance(1800)
    assert "task-1" not in harness.engine.cluster.tasks  # the sweep forgot it with the failure
    assert of_type(harness.register("peer-d", "a"), TriggerSeedPeer)  # remembered 30 min only


def test_seed_lost_mid_read_the_running_peer_with_most_pieces_reads_the_rest(harness: Harness) -> None:
    """Children holding parts of the task, no one waiting: without a replacement they would wait for ever."""
    swarm_with_seed(harness)
    harness.announce("c")
    harness.register("peer-a", "a")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    harness.start_origin("seed-peer")
    harness.pieces("seed-peer", 0, 1, 2)
    harness.register("peer-b", "b")
    harness.register("peer-c", "c")
    harness.pieces("peer-a", 0, parent="seed-peer")
    harness.pieces("peer-b", 0, 1, parent="seed-peer")
    harness.do(PeerLeft("seed-peer"))
    commands = harness.advance(EngineConfig().source_return_s)
    assert [c.peer_id for c in of_type(commands, SendBackToSource)] == ["peer-b"]  # exactly one, most pieces
    harness.do(PeerLeft("peer-c"))  # not an origin reader: nothing
    assert not of_type(harness.advance(10), SendBackToSource)


def test_no_replacement_when_a_peer_holds_the_task_whole(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.register("peer-a", "a")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    harness.start_origin("seed-peer", content_length=2 * MiB)
    harness.pieces("seed-peer", 0, 1)
    harness.register("peer-b", "b")
    harness.pieces("peer-a", 0, 1, parent="seed-peer")
    harness.do(PeerFinished("peer-a", (100, 101)))
    harness.pieces("peer-b", 0, parent="peer-a")
    harness.do(PeerLeft("seed-peer"))
    assert not of_type(harness.advance(10), SendBackToSource)


def test_seed_failing_without_origin_error_counts_as_seed_failure(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.register("peer-a", "a")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    commands = harness.do(PeerFailed("seed-peer", "disk full", back_to_source=True))
    assert [c.peer_id for c in of_type(commands, SendBackToSource)] == ["peer-a"]
    assert harness.engine.cluster.tasks["task-1"].seed_failed_at == 0.0


def test_origin_error_is_forwarded_to_every_active_peer_and_the_task_fails(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.register("peer-a", "a")
    harness.register("peer-b", "b")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    error = SourceErrorInfo(404, "Not Found", (("content-type", "text/plain"),))
    commands = harness.do(PeerFailed("seed-peer", "origin answered 404", error, back_to_source=True))
    failed = of_type(commands, SendTaskFailed)
    assert {command.peer_id for command in failed} == {"peer-a", "peer-b"}
    # what the origin said, and whose reading it was (a trust store or DNS of that host may be the cause)
    told = SourceErrorInfo(404, "Not Found (the origin was read by seed peer seed)", error.headers)
    assert all(command.source_error == told for command in failed)
    assert harness.engine.stat_task("task-1") is None  # no peer left: forgotten; a register starts it over
    assert harness.engine.scheduler.next_deadline() is None  # no retry armed

    commands = harness.register("peer-c", "b")  # a later register starts the task over
    assert of_type(commands, TriggerSeedPeer)
    view = harness.engine.stat_task("task-1")
    assert view is not None
    assert view.state == "PENDING"


def test_back_to_source_limit_and_seed_do_not_count_together() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=1, source_start_timeout_s=0))
    for name in ("a", "b", "c"):
        harness.announce(name)
    assert of_type(harness.register("peer-a", "a"), SendBackToSource)
    harness.register("peer-b", "b")
    harness.register("peer-c", "c")
    later = harness.advance(5)
    assert not of_type(later, SendBackToSource)  # the one origin slot stays with peer-a
    assert len(of_type(later, SendTaskFailed)) == 2


def test_register_from_unknown_host_is_closed(harness: Harness) -> None:
    from dfly.scheduler.core.messages import DownloadSpec, PeerRegistered

    commands = harness.do(PeerRegistered("p", "nowhere", "task-1", DownloadSpec(url="http://x/")))
    assert commands == [ClosePeer("p", "host nowhere has not announced itself")]


def test_reschedule_blocks_the_reported_parent(harness: Harness) -> None:
    from dfly.scheduler.core.messages import RescheduleRequested

    harness.announce("a")
    harness.announce("b")
    harness.announce("c")
    harness.register("peer-a", "a")
    harness.start_origin("peer-a")
    harness.register("peer-b", "b")
    harness.pieces("peer-b", 0, parent="peer-a")
    harness.register("peer-c", "c")
    commands = harness.do(RescheduleRequested("peer-c", blocked=("peer-a",)))
    [answer] = of_type(commands, SendCandidateParents)
    assert [parent.peer_id for parent in answer.parents] == ["peer-b"]


def test_more_parents_offers_only_new_parents_and_never_gives_up() -> None:
    from dfly.scheduler.core.messages import RescheduleRequested

    harness = Harness(EngineConfig(back_to_source_limit=1, push_fanout=0))  # the child asks; no push
    for name in ("a", "b", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a")
    [first] = of_type(harness.register("peer-c", "c"), SendCandidateParents)
    assert [p.peer_id for p in first.parents] == ["peer-a"]

    for _ in range(10):  # nothing new: no answer, no retry timer, no origin, no failure
        assert harness.do(RescheduleRequested("peer-c", more_parents=True)) == []
    assert harness.engine.scheduler.next_deadline() is None  # no retry armed
    assert harness.advance(60) == []

    harness.register("peer-b", "b")
    harness.pieces("peer-b", 0, parent="peer-a")
    commands = harness.do(RescheduleRequested("peer-c", more_parents=True))
    [more] = of_type(commands, SendCandidateParents)
    assert [p.peer_id for p in more.parents] == ["peer-b"]
    assert set(harness.engine.cluster.peers["peer-c"].parent_ids) == {"peer-a", "peer-b"}


def test_waiting_for_a_slow_seed_is_not_a_failed_attempt() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=1, source_start_timeout_s=10.0))
    harness.announce("seed", seed=True)
    harness.announce("a")
    harness.register("peer-a", "a")  # seed triggered; it does not register (a slow origin, a slow seed)
    assert not of_type(harness.advance(9.9), SendBackToSource)
    commands = harness.advance(1.6)  # then the ordinary counted tries run out
    [to_origin] = of_type(commands, SendBackToSource)
    assert to_origin.peer_id == "peer-a"


def test_started_moves_a_child_from_received_to_running(harness: Harness) -> None:
    from dfly.scheduler.core.messages import PeerStarted
    from dfly.scheduler.core.model import PeerState

    harness.announce("a")
    harness.announce("b")
    assert of_type(harness.register("peer-a", "a"), SendBackToSource)
    harness.start_origin("peer-a")
    [parents] = of_type(harness.register("peer-b", "b"), SendCandidateParents)
    assert parents.peer_id == "peer-b"
    child = harness.engine.cluster.peers["peer-b"]
    assert child.state is PeerState.RECEIVED  # parents handed out, nothing downloaded yet
    assert harness.do(PeerStarted("peer-b")) == []
    assert harness.engine.cluster.peers["peer-b"].state is PeerState.RUNNING


def test_a_peer_with_its_first_pieces_is_pushed_to_children_short_of_parents() -> None:
    harness = Harness(EngineConfig(back_to_source_limit=1, push_fanout=4))
    for name in ("a", "b", "c", "d"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a")
    for child in ("b", "c", "d"):
        [answer] = of_type(harness.register(f"peer-{child}", child), SendCandidateParents)
        assert [p.peer_id for p in answer.parents] == ["peer-a"]  # one parent of three: hungry
    commands = harness.pieces("peer-b", 0, parent="peer-a")
    pushed = {c.peer_id: [p.peer_id for p in c.parents] for c in of_type(commands, SendCandidateParents)}
    assert pushed == {"peer-c": ["peer-b"], "peer-d": ["peer-b"]}  # never to itself
    assert set(harness.engine.cluster.peers["peer-c"].parent_ids) == {"peer-a", "peer-b"}
    # Later batches of the same peer push nothing more (only its first pieces make it a new parent).
    assert not of_type(harness.pieces("peer-b", 1, parent="peer-a"), SendCandidateParents)


def test_a_parent_whose_last_piece_was_an_outlier_is_not_offered_until_a_normal_one() -> None:
    """Bad-parent detection from piece costs: children report each piece's cost; a parent whose last
    served piece took > 20 × its mean is skipped for new children until it serves one normally again.
    The origin reader is exempt (its children queue on it)."""
    harness = Harness(EngineConfig(candidate_parent_limit=8))
    for name in ("a", "b", "c", "d", "e", "f"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a")
    harness.register("peer-b", "b")
    harness.register("peer-c", "c")

    def served(child: str, parent: str, *costs: float, first: int = 0) -> None:
        pieces = tuple(
            FinishedPiece(first + k, 100 + first + k, parent, cost) for k, cost in enumerate(costs)
        )
        harness.do(PiecesFinished(child, pieces))

    served("peer-b", "peer-a", 9.0, 0.1, 0.1)  # slow and fast from the origin reader: exempt anyway
    served("peer-c", "peer-b", 0.1, 0.1, 0.1, first=3)
    [answer] = of_type(harness.register("peer-d", "d"), SendCandidateParents)
    assert {p.peer_id for p in answer.parents} == {"peer-a", "peer-b", "peer-c"}
    served("peer-c", "peer-b", 2.5, first=6)  # 25 × its mean
    [answer] = of_type(harness.register("peer-e", "e"), SendCandidateParents)
    assert {p.peer_id for p in answer.parents} == {"peer-a", "peer-c"}
    served("peer-c", "peer-b", 0.1, first=7)  # a normal piece again
    [answer] = of_type(harness.register("peer-f", "f"), SendCandidateParents)
    assert "peer-b" in {p.peer_id for p in answer.parents}
