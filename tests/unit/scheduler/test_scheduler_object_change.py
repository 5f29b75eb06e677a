"""After the origin's object changed (a new reader saw another ETag): who may still be a parent or count
as the task's source. Pieces are 1 KiB, three per object; the old object's digests are 100-102, the
new one's 200-202."""

from __future__ import annotations

from scheduler_testkit import Harness

from dfly.scheduler.core.messages import (
    BackToSourceStarted,
    Command,
    FinishedTask,
    HostDisconnected,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    SourceErrorInfo,
)
from dfly.scheduler.core.model import Task, TaskState


def tagged(harness: Harness, peer_id: str, etag: str) -> list[Command]:
    return harness.do(BackToSourceStarted(peer_id, 3072, 1024, (("ETag", etag),)))


def task_of(harness: Harness) -> Task:
    return harness.engine.cluster.tasks["task-1"]


def whole_old_copy_then_change(harness: Harness, *hosts: str) -> None:
    """peer-a (host a) read the old object whole; then peer-c (host c) began reading the new one."""
    for name in ("a", "c", *hosts):
        harness.announce(name)
    harness.register("peer-a", "a")
    tagged(harness, "peer-a", '"v1"')
    harness.pieces("peer-a", 0, 1, 2)
    harness.do(PeerFinished("peer-a", (100, 101, 102)))
    harness.register("peer-c", "c")
    tagged(harness, "peer-c", '"v2"')


def announced(harness: Harness, host: str, digests: tuple[int, ...]) -> FinishedTask:
    copy = FinishedTask("task-1", f"{harness.host_id(host)}-stored-task-1", 3072, 1024, digests)
    harness.announce(host, finished=(copy,))
    return copy


def test_the_old_objects_whole_copy_is_no_parent_once_it_changed() -> None:
    harness = Harness()
    for name in ("a", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    tagged(harness, "peer-a", '"v1"')
    harness.pieces("peer-a", 0, 1, 2)
    harness.do(PeerFinished("peer-a", (100, 101, 102)))
    assert "peer-a" in task_of(harness).parent_pool
    harness.register("peer-c", "c")
    tagged(harness, "peer-c", '"v2"')
    assert "peer-a" not in task_of(harness).parent_pool
    assert "peer-c" in task_of(harness).parent_pool


def test_a_reader_of_the_old_object_is_no_parent_once_it_changed() -> None:
    harness = Harness()
    for name in ("a", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    tagged(harness, "peer-a", '"v1"')
    harness.pieces("peer-a", 0, 1)
    harness.register("peer-c", "c")
    tagged(harness, "peer-c", '"v2"')
    assert "peer-a" not in task_of(harness).parent_pool  # still reading the old object
    assert "peer-c" in task_of(harness).parent_pool


def test_a_whole_copy_announced_after_the_change_is_a_parent_only_if_it_agrees() -> None:
    """An announcement names no validators: its digests are compared with the new object's published
    ones (a host holding the old object came into the parent pool with every announce)."""
    harness = Harness()
    whole_old_copy_then_change(harness, "d", "e")
    harness.pieces("peer-c", 0, 1, 2, digest_base=200)
    old = announced(harness, "d", (100, 101, 102))
    new = announced(harness, "e", (200, 201, 202))
    assert old.peer_id in task_of(harness).peers
    assert old.peer_id not in task_of(harness).parent_pool
    assert new.peer_id in task_of(harness).parent_pool
    assert task_of(harness).published_digests == {0: 200, 1: 201, 2: 202}


def test_a_reconnected_host_offers_no_copy_of_the_old_object() -> None:
    harness = Harness()
    whole_old_copy_then_change(harness)
    harness.pieces("peer-c", 0, 1, 2, digest_base=200)
    harness.do(HostDisconnected(harness.host_id("a")))
    harness.announce("a")  # back after its keepalive stream dropped: it came back as a parent
    assert "peer-a" not in task_of(harness).parent_pool
    harness.do(HostDisconnected(harness.host_id("c")))
    harness.announce("c")
    assert "peer-c" in task_of(harness).parent_pool


def test_an_old_objects_reader_does_not_become_a_parent_with_its_first_pieces() -> None:
    """Both readers began before either reported a piece: the old one's first report put it back."""
    harness = Harness()
    for name in ("a", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    tagged(harness, "peer-a", '"v1"')
    harness.register("peer-c", "c")
    tagged(harness, "peer-c", '"v2"')
    harness.pieces("peer-a", 0)
    assert "peer-a" not in task_of(harness).parent_pool


def test_a_copy_agreeing_with_the_first_published_pieces_only_is_no_parent() -> None:
    """The changed object kept its first piece; an old copy matched what was published so far."""
    harness = Harness()
    whole_old_copy_then_change(harness, "d")
    harness.pieces("peer-c", 0)  # digest 100: the new object's first piece is the old one's
    old = announced(harness, "d", (100, 101, 102))
    assert old.peer_id not in task_of(harness).parent_pool


def test_an_idle_task_takes_an_announced_copy_as_its_object_again() -> None:
    """Every peer left a task kept idle for a seed failure: its digests were forgotten but its object
    version was not, so no announced whole copy could ever be a parent again."""
    harness = Harness()
    whole_old_copy_then_change(harness, "e")
    harness.pieces("peer-c", 0, 1, 2, digest_base=200)
    harness.do(PeerFinished("peer-c", (200, 201, 202)))
    task_of(harness).seed_failed_at = harness.now
    harness.do(PeerLeft("peer-a"))
    harness.do(PeerLeft("peer-c"))
    copy = announced(harness, "e", (200, 201, 202))
    assert copy.peer_id in task_of(harness).parent_pool


def test_an_old_objects_copy_does_not_stop_the_lost_source_from_being_replaced() -> None:
    """The new object's reader left mid-read; a whole copy of the old object (no parent) counted as the
    task's source, so nobody was sent to read the rest from the origin."""
    harness = Harness()
    whole_old_copy_then_change(harness, "b", "d")
    harness.register("peer-b", "b")
    harness.pieces("peer-c", 0, digest_base=200)
    harness.do(PeerLeft("peer-a"))
    announced(harness, "d", (100, 101, 102))
    harness.pieces("peer-b", 0, parent="peer-c", digest_base=200)
    harness.do(PeerLeft("peer-c"))
    harness.advance(120)
    assert task_of(harness).origin_readers


def test_an_old_objects_reader_does_not_count_as_the_source() -> None:
    """It stayed among the task's origin readers: when the new object's reader left, nobody was sent to
    read the rest, and the old reader counted against back_to_source_limit."""
    harness = Harness()
    for name in ("a", "b", "c"):
        harness.announce(name)
    harness.register("peer-a", "a")
    tagged(harness, "peer-a", '"v1"')  # still reading the old object
    harness.register("peer-c", "c")
    tagged(harness, "peer-c", '"v2"')
    assert task_of(harness).origin_readers == {"peer-c"}
    harness.register("peer-b", "b")
    harness.pieces("peer-c", 0, digest_base=200)
    harness.pieces("peer-b", 0, parent="peer-c", digest_base=200)
    harness.do(PeerLeft("peer-c"))
    harness.advance(120)
    assert task_of(harness).origin_readers == {"peer-b"}  # sent to read the rest


def test_a_failed_task_that_starts_over_keeps_the_old_objects_copy_out() -> None:
    harness = Harness()
    whole_old_copy_then_change(harness, "d", "e")
    harness.pieces("peer-c", 0, 1, 2, digest_base=200)
    harness.do(PeerFinished("peer-c", (200, 201, 202)))
    harness.register("peer-d", "d", need_back_to_source=True)
    harness.do(PeerFailed("peer-d", "503", SourceErrorInfo(503, "unavailable"), back_to_source=True))
    assert task_of(harness).state is TaskState.FAILED
    harness.register("peer-e", "e")  # the task starts over
    harness.do(HostDisconnected(harness.host_id("a")))
    harness.announce("a")
    assert "peer-a" not in task_of(harness).parent_pool
    harness.do(HostDisconnected(harness.host_id("c")))
    harness.announce("c")
    assert "peer-c" in task_of(harness).parent_pool


def test_a_copy_announced_before_the_publication_is_complete_joins_once_it_is() -> None:
    harness = Harness()
    whole_old_copy_then_change(harness, "d")
    harness.pieces("peer-c", 0, 1, digest_base=200)
    copy = announced(harness, "d", (200, 201, 202))
    assert copy.peer_id not in task_of(harness).parent_pool
    harness.pieces("peer-c", 2, digest_base=200)
    assert copy.peer_id in task_of(harness).parent_pool
