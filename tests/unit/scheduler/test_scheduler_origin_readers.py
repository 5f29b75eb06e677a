"""Origin readers around scheduler restarts, leeches and seed hosts: who reads the origin, and when."""

from __future__ import annotations

from scheduler_testkit import Harness, host_info, of_type, swarm_with_seed

from dfly.common.pieces import MiB
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.messages import (
    FinishedTask,
    HostAnnounced,
    PeerLeft,
    SeedTriggerFailed,
    SendBackToSource,
    SendCandidateParents,
    TriggerSeedPeer,
)


def test_after_a_restart_a_peer_waits_for_hosts_to_come_back_before_the_origin() -> None:
    """A scheduler that just started knows no seed yet: the peer waits (uncounted) for the grace period."""
    harness = Harness(started_at=0.0)
    harness.announce("a")
    harness.announce("b")
    harness.advance(1.0)
    assert not of_type(harness.register("peer-a", "a"), SendBackToSource)
    # A download that was reading the origin before the restart registers again and reports pieces.
    harness.register("peer-r", "b", need_back_to_source=True)
    commands = harness.start_origin("peer-r") + harness.pieces("peer-r", 0)
    [answer] = of_type(commands, SendCandidateParents)
    assert (answer.peer_id, [p.peer_id for p in answer.parents]) == ("peer-a", ["peer-r"])


def test_the_start_up_grace_ends_and_a_lone_peer_reads_the_origin() -> None:
    harness = Harness(started_at=0.0)
    harness.announce("a")
    assert not of_type(harness.register("peer-a", "a"), SendBackToSource)
    sent = of_type(harness.advance(EngineConfig().startup_grace_s + 0.1), SendBackToSource)
    assert [c.peer_id for c in sent] == ["peer-a"]


def test_a_leech_reading_the_origin_is_nobodys_source() -> None:
    """A leech reads the origin for itself only: others still get a source, and it never replaces one."""
    harness = Harness()
    harness.announce("leech", piece_port=0)
    harness.announce("a")
    harness.announce("b")
    assert of_type(harness.register("peer-l", "leech"), SendBackToSource)  # no seed: reads for itself
    harness.start_origin("peer-l")
    sent = of_type(harness.register("peer-a", "a"), SendBackToSource)
    assert [c.peer_id for c in sent] == ["peer-a"]  # the limit of 1 was not used up by the leech
    harness.start_origin("peer-a")
    harness.pieces("peer-a", 0)
    harness.register("peer-b", "b")
    harness.pieces("peer-l", 0, 1, 2)
    harness.do(PeerLeft("peer-a"))  # the source goes: b takes over, not the leech
    commands = harness.advance(EngineConfig().source_return_s)
    assert [c.peer_id for c in of_type(commands, SendBackToSource)] == ["peer-b"]


def test_a_triggered_seed_that_already_holds_the_task_answers_with_its_announce() -> None:
    harness = Harness()
    harness.announce("seed", seed=True)
    harness.announce("a")
    [trigger] = of_type(harness.register("peer-a", "a"), TriggerSeedPeer)
    held = FinishedTask("task-1", "seed-stored", 2 * MiB, MiB, (100, 101), "http://origin/file")
    commands = harness.do(HostAnnounced(host_info("seed", seed=True), (held,)))
    [answer] = of_type(commands, SendCandidateParents)
    assert (answer.peer_id, [p.peer_id for p in answer.parents]) == ("peer-a", ["seed-stored"])
    assert not harness.engine.cluster.tasks["task-1"].seed_trigger_pending
    assert trigger.seed_host_id == harness.host_id("seed")


def test_an_origin_reader_whose_stream_broke_comes_back_and_is_not_replaced(harness: Harness) -> None:
    swarm_with_seed(harness)
    harness.register("peer-a", "a")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    harness.start_origin("seed-peer")
    harness.pieces("seed-peer", 0)
    harness.register("peer-b", "b")
    harness.pieces("peer-a", 0, parent="seed-peer")
    harness.do(PeerLeft("seed-peer"))
    harness.advance(0.5)
    back = harness.register("seed-peer", "seed", need_back_to_source=True)  # registers again
    assert [c.peer_id for c in of_type(back, SendBackToSource)] == ["seed-peer"]
    harness.start_origin("seed-peer")
    assert not of_type(harness.advance(10), SendBackToSource)  # nobody else sent to the origin


def test_a_download_on_a_seed_host_reads_the_origin_itself_even_during_the_start_up_grace() -> None:
    """Dragonfly's rule: a seed host's own download (e.g. through its proxy) triggers no other seed."""
    harness = Harness(started_at=0.0)
    harness.announce("seed-1", seed=True)
    harness.announce("seed-2", seed=True)
    harness.announce("a")
    commands = harness.register("peer-s", "seed-1")  # a normal download on a seed host
    assert not of_type(commands, TriggerSeedPeer)
    assert [c.peer_id for c in of_type(commands, SendBackToSource)] == ["peer-s"]
    harness.start_origin("peer-s")
    harness.pieces("peer-s", 0)
    commands = harness.register("peer-a", "a")  # it is the task's source: no seed triggered for others
    assert not of_type(commands, TriggerSeedPeer)
    [answer] = of_type(commands, SendCandidateParents)
    assert [p.peer_id for p in answer.parents] == ["peer-s"]


def test_an_unreachable_seed_is_suspended_for_every_task_a_refusing_one_only_for_its_task() -> None:
    harness = Harness()
    swarm_with_seed(harness)
    [trigger] = of_type(harness.register("peer-a", "a"), TriggerSeedPeer)
    harness.do(SeedTriggerFailed("task-1", trigger.seed_host_id, "refused"))
    assert of_type(harness.register("peer-b", "b", task_id="task-2"), TriggerSeedPeer)  # still tried
    harness.do(SeedTriggerFailed("task-2", trigger.seed_host_id, "DEADLINE_EXCEEDED", unreachable=True))
    commands = harness.register("peer-c", "a", task_id="task-3")  # no other task waits for it now
    assert not of_type(commands, TriggerSeedPeer)
    assert [c.peer_id for c in of_type(commands, SendBackToSource)] == ["peer-c"]
    harness.advance(EngineConfig().unreachable_suspend_s)
    assert of_type(harness.register("peer-d", "b", task_id="task-4"), TriggerSeedPeer)  # suspension over
