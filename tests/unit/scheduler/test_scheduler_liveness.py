"""Host liveness: disconnect and unreachable reports suspend, a new boot drops peers, finished tasks
make a reconnecting host a parent again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler_testkit import Harness, finished_on_a, host_info, of_type

from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.messages import (
    ClosePeer,
    Command,
    FinishedTask,
    HostAnnounced,
    HostDisconnected,
    HostKeepAlive,
    HostLeft,
    RescheduleRequested,
    SendCandidateParents,
    TaskDeleted,
    TriggerSeedPeer,
)


def two_parents(harness: Harness) -> None:
    """peer-a reads the origin on host a, peer-b holds pieces on host b; hosts c, d, e are children."""
    for name in ("a", "b", "c", "d", "e"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a")
    harness.register("peer-b", "b")
    harness.pieces("peer-b", 0, parent="peer-a")


def parents_of(commands: Sequence[Command], child: str) -> set[str]:
    return {
        parent.peer_id
        for command in commands
        if isinstance(command, SendCandidateParents) and command.peer_id == child
        for parent in command.parents
    }


def test_disconnect_suspends_at_once_and_keepalive_lifts_it() -> None:
    harness = Harness()
    two_parents(harness)
    harness.do(HostDisconnected(harness.host_id("a")))
    assert parents_of(harness.register("peer-c", "c"), "peer-c") == {"peer-b"}
    harness.do(HostDisconnected(harness.host_id("b")))
    assert not harness.register("peer-d", "d")  # nothing usable: waits
    commands = harness.do(HostKeepAlive(harness.host_id("b"), "boot-1", 0.0, 0))
    assert parents_of(commands, "peer-d") == {"peer-b"}  # scheduled on the keepalive, no timer


def test_disconnect_of_an_old_boot_is_ignored() -> None:
    harness = Harness()
    two_parents(harness)
    harness.do(HostDisconnected(harness.host_id("b"), boot_id="boot-0"))
    assert not harness.engine.cluster.hosts[harness.host_id("b")].disconnected


def test_two_distinct_children_reporting_unreachable_suspend_the_host() -> None:
    harness = Harness(EngineConfig(unreachable_suspend_s=60))
    two_parents(harness)
    harness.register("peer-c", "c")
    harness.register("peer-d", "d")
    host_b = harness.engine.cluster.hosts[harness.host_id("b")]
    harness.do(RescheduleRequested("peer-c", unreachable=("peer-b",)))
    assert not host_b.is_suspended(harness.now)  # one report is not enough
    harness.do(RescheduleRequested("peer-c", unreachable=("peer-b",)))
    assert not host_b.is_suspended(harness.now)  # the same child twice is still one
    harness.do(RescheduleRequested("peer-d", unreachable=("peer-b",)))
    assert host_b.is_suspended(harness.now)
    assert parents_of(harness.register("peer-e", "e"), "peer-e") == {"peer-a"}
    harness.advance(61)
    assert not host_b.is_suspended(harness.now)


def test_new_boot_id_drops_the_hosts_old_peers() -> None:
    harness = Harness()
    two_parents(harness)
    commands = harness.do(HostAnnounced(host_info("b", boot_id="boot-2")))
    assert ClosePeer("peer-b", f"host {harness.host_id('b')} restarted") in commands
    assert "peer-b" not in harness.engine.cluster.peers
    assert parents_of(harness.register("peer-c", "c"), "peer-c") == {"peer-a"}


def test_reconnect_with_finished_tasks_reoffers_the_host() -> None:
    harness = finished_on_a(*("a", "b", "c"))
    harness.do(HostLeft(harness.host_id("a")))
    assert not harness.register("peer-c", "c", disable_back_to_source=True)  # nobody holds it

    finished = FinishedTask("task-1", "peer-a2", 2048, 1024, (100, 101), "http://origin/file")
    commands = harness.do(HostAnnounced(host_info("a", boot_id="boot-2"), (finished,)))
    assert parents_of(commands, "peer-c") == {"peer-a2"}
    view = harness.engine.stat_task("task-1")
    assert view is not None
    assert view.state == "SUCCEEDED"
    assert view.piece_digests == (100, 101)


def test_a_reconnect_does_not_add_a_second_finished_peer_for_a_task_seen_finishing() -> None:
    """The host's own download finished here; when it announces again (its keepalive broke) it lists the
    task as held: that is the same copy, not a second parent on the same host."""
    harness = finished_on_a(*("a", "b"))
    harness.do(HostDisconnected(harness.host_id("a")))
    stored = FinishedTask("task-1", f"{harness.host_id('a')}-stored", 2048, 1024, (100, 101))
    harness.do(HostAnnounced(host_info("a"), (stored,)))
    view = harness.engine.stat_task("task-1")
    assert view is not None
    assert view.peer_count == 1
    assert parents_of(harness.register("peer-b", "b"), "peer-b") == {"peer-a"}


def test_a_deleted_task_is_no_longer_offered_from_that_host() -> None:
    harness = finished_on_a(*("a", "b", "c", "d"))
    harness.register("peer-b", "b")  # running: it reports for itself, a TaskDeleted does not touch it
    harness.pieces("peer-b", 0, parent="peer-a")
    assert parents_of(harness.register("peer-c", "c"), "peer-c") == {"peer-a", "peer-b"}

    harness.do(TaskDeleted(harness.host_id("a"), "task-1"))
    harness.do(TaskDeleted(harness.host_id("b"), "task-1"))
    assert "peer-a" not in harness.engine.cluster.peers
    assert "peer-b" in harness.engine.cluster.peers
    assert parents_of(harness.register("peer-d", "d"), "peer-d") == {"peer-b"}
    assert harness.do(TaskDeleted(harness.host_id("a"), "no-such-task")) == []
    assert harness.do(TaskDeleted("10.9.9.9-gone", "task-1")) == []


def test_finished_task_with_another_layout_is_not_offered() -> None:
    harness = Harness()
    for name in ("a", "b", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a", content_length=2048, piece_length=1024)
    stale = FinishedTask("task-1", "peer-old", 4096, 1024, (1, 2, 3, 4))
    harness.do(HostAnnounced(host_info("b"), (stale,)))
    assert "peer-old" not in harness.engine.cluster.peers


def test_host_left_closes_its_active_peers() -> None:
    harness = Harness()
    two_parents(harness)
    commands = harness.do(HostLeft(harness.host_id("b")))
    assert of_type(commands, ClosePeer) == [ClosePeer("peer-b", f"host {harness.host_id('b')} left")]
    assert harness.host_id("b") not in harness.engine.cluster.hosts


def test_two_children_reporting_corrupt_pieces_suspend_the_host_longer() -> None:
    harness = Harness(EngineConfig(corrupt_suspend_s=600))
    two_parents(harness)
    harness.register("peer-c", "c")
    harness.register("peer-d", "d")
    host_b = harness.engine.cluster.hosts[harness.host_id("b")]
    harness.do(RescheduleRequested("peer-c", more_parents=True, corrupt=("peer-b",)))
    assert not host_b.is_suspended(harness.now)  # one child's word is not enough
    assert "peer-b" in harness.engine.cluster.peers["peer-c"].blocked  # but that child never gets it again
    harness.do(RescheduleRequested("peer-d", corrupt=("peer-b",)))
    assert host_b.is_suspended(harness.now)
    assert parents_of(harness.register("peer-e", "e"), "peer-e") == {"peer-a"}
    harness.advance(599)
    assert host_b.is_suspended(harness.now)
    harness.advance(2)
    assert not host_b.is_suspended(harness.now)


def test_a_host_whose_keepalives_stop_is_not_offered_until_they_resume() -> None:
    """A hung daemon keeps its gRPC streams open: its silence, not a dropped stream, must suspend it."""
    harness = finished_on_a("a", "b", "c")
    keepalive = HostKeepAlive(harness.host_id("a"), "boot-1", 0.0, 0)
    harness.do(keepalive)
    harness.advance(20)
    assert parents_of(harness.register("peer-b", "b"), "peer-b") == {"peer-a"}  # 20 s: still alive
    harness.advance(15)
    assert parents_of(harness.register("peer-c", "c", disable_back_to_source=True), "peer-c") == set()
    assert parents_of(harness.do(keepalive), "peer-c") == {"peer-a"}  # back: waiting children get it


def test_disconnected_hosts_do_not_crowd_live_parents_out_of_the_sample() -> None:
    """Crashed hosts send no LeaveHost; their finished peers had filled the candidate samples (15 per
    attempt), and children of a task with one live holder among 50 dead ones went to the origin."""
    harness = Harness()

    def held(peer_id: str) -> tuple[FinishedTask, ...]:
        return (
            FinishedTask("task-1", peer_id, content_length=2048, piece_length=1024, piece_digests=(100, 101)),
        )

    for n in range(50):
        harness.announce(f"dead-{n}", finished=held(f"old-{n}"))
        harness.do(HostDisconnected(harness.host_id(f"dead-{n}")))
    harness.announce("live", finished=held("holder"))
    for n in range(20):
        harness.announce(f"child-{n}")
        assert parents_of(harness.register(f"peer-{n}", f"child-{n}"), f"peer-{n}") == {"holder"}


def test_a_host_disconnected_for_host_ttl_is_forgotten_with_its_peers() -> None:
    harness = finished_on_a("a", "b")
    harness.register("peer-b", "b")
    harness.do(HostDisconnected(harness.host_id("a")))
    harness.advance(3590)
    assert harness.engine.has_host(harness.host_id("a"))
    harness.advance(20)
    assert not harness.engine.has_host(harness.host_id("a"))
    assert "peer-a" not in harness.engine.cluster.peers
    assert harness.engine.has_host(harness.host_id("b"))  # announced, never disconnected


class CountingPeers(dict[str, Any]):
    """The cluster's peer table, counting lookups: the work an event does over peers."""

    lookups = 0

    def __getitem__(self, key: str) -> Any:
        CountingPeers.lookups += 1
        return super().__getitem__(key)


def test_a_connected_hosts_announce_and_deletion_cost_what_they_name_not_what_it_holds() -> None:
    """A seed holding 100,000 tasks announces them in ~30 chunks and deletes evicted ones one by one: each
    of those events must not walk every peer of the host (it did: 7.6 s of scheduler loop for the
    announce, 41 ms per deletion)."""
    harness = Harness()
    host = harness.announce("seed", seed=True)
    held = tuple(FinishedTask(f"t{n}", f"{host}-stored-t{n}", 1024, 1024, (n,)) for n in range(2000))
    harness.do(HostAnnounced(host_info("seed", seed=True), held))
    harness.do(HostKeepAlive(host, "boot-1", 0.0, 0))
    harness.engine.cluster.peers = CountingPeers(harness.engine.cluster.peers)
    CountingPeers.lookups = 0
    harness.do(
        HostAnnounced(
            host_info("seed", seed=True), (FinishedTask("new", f"{host}-stored-new", 1024, 1024, (1,)),)
        )
    )
    harness.do(TaskDeleted(host, "t7"))
    assert CountingPeers.lookups < 50
    view = harness.engine.stat_task("new")
    assert view is not None
    assert view.peer_count == 1
    assert harness.engine.stat_task("t7") is None
    assert harness.engine.stat_task("t8") is not None


def test_a_host_cannot_take_over_another_hosts_peer_by_naming_it() -> None:
    """Host ids contain dashes, so a peer id's prefix does not tell its host apart for sure ("n-1" and
    "n-1-2"): a finished task naming a peer another host holds is not taken, whatever its name."""
    harness = finished_on_a(*("a", "b"))
    victim = harness.engine.cluster.peers["peer-a"]
    harness.do(HostAnnounced(host_info("b"), (FinishedTask("task-1", "peer-a", 2048, 1024, (100, 101)),)))
    assert harness.engine.cluster.peers["peer-a"] is victim
    assert victim.host_id == harness.host_id("a")


def test_a_held_tasks_url_is_never_the_download_a_seed_is_asked_for() -> None:
    """A host announces a task it holds (its URL shown without the query); later it is suspended and a
    requester needs the seed: the trigger carries the requester's own URL and Authorization, not the
    announced URL (that was taken as the task's download, so the seed read the origin without them)."""
    harness = Harness()
    harness.announce("seed", seed=True)
    held = FinishedTask("task-1", "peer-a-stored", 2048, 1024, (100, 101), "http://origin/file?…")
    harness.announce("a", finished=(held,))
    assert harness.engine.cluster.tasks["task-1"].download is None
    harness.do(HostDisconnected(harness.host_id("a")))  # the only holder is not offered any more
    harness.announce("b")
    headers = (("Authorization", "Bearer t0k3n"),)
    commands = harness.register("peer-b", "b", url="http://origin/file?sig=s", request_headers=headers)
    [trigger] = of_type(commands, TriggerSeedPeer)
    assert (trigger.download.url, trigger.download.request_headers) == ("http://origin/file?sig=s", headers)
