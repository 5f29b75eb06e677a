"""The only peer holding a task whole (here the seed, done with its origin read) goes away while
children still copy from it: gone (host left, task deleted), cut off (keepalive dropped) or suspended
(children's reports). Once the children stop reporting new pieces for `source_return_s`, the running one
holding most pieces reads the rest from the origin; nobody does while a usable whole holder remains.
"""

from __future__ import annotations

import pytest
from scheduler_testkit import Harness, of_type, swarm_with_seed

from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.messages import (
    Command,
    Event,
    HostDisconnected,
    HostKeepAlive,
    HostLeft,
    PeerFinished,
    RescheduleRequested,
    SeedTriggerFailed,
    SendBackToSource,
    SendCandidateParents,
    SendTaskFailed,
    TaskDeleted,
    TriggerSeedPeer,
)

RETURN_S = EngineConfig().source_return_s
DIGESTS = (100, 101, 102, 103)


def seed_done_children_copying(harness: Harness) -> None:
    """The seed read task-1 (4 pieces) and finished; a holds pieces 0 and 1, b holds piece 2."""
    swarm_with_seed(harness)
    harness.register("peer-a", "a")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    harness.start_origin("seed-peer")
    harness.pieces("seed-peer", 0, 1, 2, 3)
    harness.do(PeerFinished("seed-peer", DIGESTS))
    harness.register("peer-b", "b")
    assert [c.peer_id for c in of_type(harness.log, SendCandidateParents)] == ["peer-a", "peer-b"]
    harness.pieces("peer-a", 0, 1, parent="seed-peer")
    harness.pieces("peer-b", 2, parent="seed-peer")


def sent_to_origin(commands: list[Command]) -> list[str]:
    return [c.peer_id for c in of_type(commands, SendBackToSource)]


def seed_gone(harness: Harness, how: str) -> Event:
    seed_host = harness.host_id("seed")
    if how == "disconnected":  # the keepalive stream dropped (a crash)
        return HostDisconnected(seed_host)
    if how == "left":  # a clean stop
        return HostLeft(seed_host)
    return TaskDeleted(seed_host, "task-1")  # its GC removed the task


@pytest.mark.parametrize("how", ["disconnected", "left", "deleted"])
def test_the_running_peer_holding_most_reads_the_rest_once_the_last_whole_copy_is_gone(
    harness: Harness, how: str
) -> None:
    seed_done_children_copying(harness)
    assert not sent_to_origin(harness.do(seed_gone(harness, how)))
    assert not sent_to_origin(harness.advance(RETURN_S - 0.1))
    assert sent_to_origin(harness.advance(0.2)) == ["peer-a"]
    assert not sent_to_origin(harness.advance(60))  # one reader, not one per check


def test_children_still_trading_pieces_put_the_origin_off(harness: Harness) -> None:
    seed_done_children_copying(harness)
    harness.do(HostDisconnected(harness.host_id("seed")))
    harness.advance(RETURN_S - 1)
    harness.pieces("peer-a", 2, parent="peer-b")  # progress: maybe the cut-off seed still serves
    assert not sent_to_origin(harness.advance(RETURN_S - 0.5))
    assert sent_to_origin(harness.advance(1)) == ["peer-a"]


def test_a_holder_whose_keepalive_comes_back_in_time_is_not_replaced(harness: Harness) -> None:
    seed_done_children_copying(harness)
    seed_host = harness.host_id("seed")
    harness.do(HostDisconnected(seed_host))
    harness.advance(1)
    harness.do(HostKeepAlive(seed_host, "boot-1", 0.0, 0))
    assert not sent_to_origin(harness.advance(10))  # (silent for host_silence_s, it would be cut off)


def test_another_whole_holder_on_a_usable_host_keeps_the_children_off_the_origin(harness: Harness) -> None:
    seed_done_children_copying(harness)
    harness.announce("c")
    harness.register("peer-c", "c")
    harness.pieces("peer-c", 0, 1, 2, 3, parent="seed-peer")
    harness.do(PeerFinished("peer-c", DIGESTS))
    harness.do(HostDisconnected(harness.host_id("seed")))
    assert not sent_to_origin(harness.advance(60))


def test_a_holder_suspended_by_childrens_corrupt_reports_is_replaced(harness: Harness) -> None:
    seed_done_children_copying(harness)
    for child in ("peer-a", "peer-b"):  # two distinct hosts: the corrupt_reports quorum
        harness.do(RescheduleRequested(child, corrupt=("seed-peer",), more_parents=True))
    assert sent_to_origin(harness.advance(RETURN_S + 0.1)) == ["peer-a"]


def test_one_report_short_of_the_quorum_replaces_nobody(harness: Harness) -> None:
    seed_done_children_copying(harness)
    harness.do(RescheduleRequested("peer-a", corrupt=("seed-peer",), more_parents=True))
    assert not sent_to_origin(harness.advance(60))


def triggered_seed_left_no_back_to_source(harness: Harness) -> TriggerSeedPeer:
    """Two seed hosts; peer-a may not read the origin; the triggered seed read task-1, finished, and
    left while peer-a held one piece. Returns that first trigger."""
    swarm_with_seed(harness)
    harness.announce("seed-2", seed=True)
    harness.register("peer-a", "a", disable_back_to_source=True)
    [first] = of_type(harness.log, TriggerSeedPeer)
    seed_name = "seed" if first.seed_host_id == harness.host_id("seed") else "seed-2"
    harness.register("seed-peer", seed_name, need_back_to_source=True)
    harness.start_origin("seed-peer")
    harness.pieces("seed-peer", 0, 1, 2, 3)
    harness.do(PeerFinished("seed-peer", DIGESTS))
    harness.pieces("peer-a", 0, parent="seed-peer")
    harness.do(HostLeft(first.seed_host_id))
    return first


def test_children_that_may_not_read_the_origin_get_the_seed_triggered_again(harness: Harness) -> None:
    first = triggered_seed_left_no_back_to_source(harness)
    commands = harness.advance(RETURN_S + 0.1)
    [again] = of_type(commands, TriggerSeedPeer)
    assert again.seed_host_id != first.seed_host_id
    assert not sent_to_origin(commands)


def test_children_that_may_not_read_the_origin_fail_when_no_seed_is_left(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.register("peer-a", "a", disable_back_to_source=True)
    harness.register("peer-b", "b", disable_back_to_source=True)
    harness.register("seed-peer", "seed", need_back_to_source=True)
    harness.start_origin("seed-peer")
    harness.pieces("seed-peer", 0, 1, 2, 3)
    harness.do(PeerFinished("seed-peer", DIGESTS))
    harness.pieces("peer-a", 0, 1, parent="seed-peer")
    harness.pieces("peer-b", 2, parent="seed-peer")
    harness.do(HostDisconnected(harness.host_id("seed")))
    failed = of_type(harness.advance(RETURN_S + 0.1), SendTaskFailed)
    assert sorted(f.peer_id for f in failed) == ["peer-a", "peer-b"]
    assert "back-to-source is disabled" in failed[0].description


def test_a_seed_trigger_that_fails_then_fails_the_children_that_may_not_read_the_origin(
    harness: Harness,
) -> None:
    triggered_seed_left_no_back_to_source(harness)
    [again] = of_type(harness.advance(RETURN_S + 0.1), TriggerSeedPeer)
    harness.do(SeedTriggerFailed("task-1", again.seed_host_id, "refused"))
    [failed] = of_type(harness.advance(RETURN_S + 0.1), SendTaskFailed)
    assert failed.peer_id == "peer-a"


def test_a_leech_that_may_read_the_origin_reads_it_for_itself_and_is_not_failed(harness: Harness) -> None:
    """Review finding: the leech was failed with the others' reason ("back-to-source is disabled")."""
    swarm_with_seed(harness)
    harness.announce("l", piece_port=0)
    harness.register("peer-a", "a", disable_back_to_source=True)
    harness.register("seed-peer", "seed", need_back_to_source=True)
    harness.start_origin("seed-peer")
    harness.pieces("seed-peer", 0, 1, 2, 3)
    harness.do(PeerFinished("seed-peer", DIGESTS))
    harness.register("peer-l", "l")
    harness.pieces("peer-a", 0, parent="seed-peer")
    harness.pieces("peer-l", 1, parent="seed-peer")
    harness.do(HostLeft(harness.host_id("seed")))
    commands = harness.advance(RETURN_S + 0.1)
    assert sent_to_origin(commands) == ["peer-l"]
    assert [f.peer_id for f in of_type(commands, SendTaskFailed)] == ["peer-a"]


def test_a_loss_just_before_an_earlier_armed_look_still_gets_its_full_return_time(harness: Harness) -> None:
    """Review finding: one pending look per task kept the earliest time, so a holder cut off 0.1 s
    before it was replaced without its `source_return_s` to come back."""
    seed_done_children_copying(harness)
    harness.announce("c")
    harness.register("peer-c", "c")
    harness.pieces("peer-c", 0, 1, 2, 3, parent="seed-peer")
    harness.do(PeerFinished("peer-c", DIGESTS))  # a second whole holder
    harness.advance(5)
    harness.do(TaskDeleted(harness.host_id("c"), "task-1"))  # arms a look for RETURN_S from now
    harness.advance(RETURN_S - 0.1)
    seed_host = harness.host_id("seed")
    harness.do(HostDisconnected(seed_host))  # now nobody usable holds it whole
    assert not sent_to_origin(harness.advance(0.2))  # not 0.1 s after the cut
    harness.do(HostKeepAlive(seed_host, "boot-1", 0.0, 0))  # back within its source_return_s
    assert not sent_to_origin(harness.advance(RETURN_S))


def test_reports_against_a_host_already_suspended_look_at_nothing_again(harness: Harness) -> None:
    seed_done_children_copying(harness)
    harness.announce("c")
    harness.register("peer-c", "c")
    for child in ("peer-a", "peer-b"):
        harness.do(RescheduleRequested(child, unreachable=("seed-peer",), more_parents=True))
    checks = harness.engine.scheduler._source_check_due  # the pending looks
    assert list(checks) == ["task-1"]
    checks.clear()
    for child in ("peer-c", "peer-a"):  # a second quorum while the host is still suspended
        harness.do(RescheduleRequested(child, unreachable=("seed-peer",), more_parents=True))
    assert checks == {}
