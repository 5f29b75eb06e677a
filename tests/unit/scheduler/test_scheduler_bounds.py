"""What the scheduler keeps is bounded by what exists: a task no peer holds any more is forgotten (a
changed object gets fresh digests), digests past a task's layout are never stored, reports name only the
task's own parents, and a seed is asked under its own time limit."""

from __future__ import annotations

from scheduler_testkit import Harness, finished_on_a, of_type, swarm_with_seed

from dfly.scheduler.core.messages import (
    FinishedTask,
    PeerFinished,
    RescheduleRequested,
    SendFinishVerdict,
    SendTaskFailed,
    TaskDeleted,
    TriggerSeedPeer,
)


def test_a_task_every_holder_deleted_starts_over_with_the_new_objects_digests() -> None:
    """Before: the old digests stayed the reference for ever, and every child of the changed object was
    told bad_pieces for every piece."""
    harness = finished_on_a("a", "b", "c")
    harness.do(TaskDeleted(harness.host_id("a"), "task-1"))
    assert harness.engine.stat_task("task-1") is None

    harness.register("peer-b", "b")
    harness.start_origin("peer-b", content_length=2048, piece_length=1024)
    harness.pieces("peer-b", 0, 1, digest_base=200)
    assert of_type(harness.do(PeerFinished("peer-b", (200, 201))), SendFinishVerdict)[0].accepted
    harness.register("peer-c", "c")
    harness.pieces("peer-c", 0, 1, parent="peer-b", digest_base=200)
    (verdict,) = of_type(harness.do(PeerFinished("peer-c", (200, 201))), SendFinishVerdict)
    assert verdict.accepted, verdict.bad_pieces


def test_an_origin_reader_cannot_publish_more_digests_than_the_layout_has() -> None:
    """One message of zeros (1 byte each on the wire) grew the task by millions of digests."""
    harness = finished_on_a("a")
    harness.announce("b")
    harness.register("peer-b", "b", task_id="task-2", need_back_to_source=True)
    harness.start_origin("peer-b", content_length=2048, piece_length=1024)
    harness.pieces("peer-b", 0, 1, 5000)  # piece 5000 does not exist
    assert harness.engine.cluster.tasks["task-2"].published_digests == {0: 100, 1: 101}
    commands = harness.do(PeerFinished("peer-b", (0,) * 100_000))
    assert "100000 piece digests; the task has 2 pieces" in of_type(commands, SendTaskFailed)[0].description


def test_a_child_finishing_where_no_layout_is_known_yet_is_judged_as_before() -> None:
    """A scheduler that restarted while the child downloaded knows no layout for the task: the child's
    finish is not a protocol error (its download must not fail at the very end)."""
    harness = Harness()
    harness.announce("c")
    harness.register("peer-c", "c", disable_back_to_source=True)
    (verdict,) = of_type(harness.do(PeerFinished("peer-c", (200, 201))), SendFinishVerdict)
    assert verdict.accepted


def test_a_finished_task_with_a_digest_list_of_another_length_is_not_taken() -> None:
    harness = Harness()
    wrong = FinishedTask("task-1", "peer-x", content_length=2048, piece_length=1024, piece_digests=(0,) * 9)
    harness.announce("a", finished=(wrong,))
    assert harness.engine.stat_task("task-1") is None


def test_reports_name_only_parents_of_the_childs_task() -> None:
    """A reschedule naming peers of other tasks (or none at all) neither grows the child's blocked set nor
    counts toward suspending their hosts."""
    harness = finished_on_a("a", "b", "c")
    harness.register("peer-z", "b", task_id="task-2")
    harness.register("peer-c", "c")
    unknown = tuple(f"nobody-{n}" for n in range(1000))
    harness.do(RescheduleRequested("peer-c", blocked=unknown, unreachable=("peer-z",), corrupt=("peer-z",)))
    assert harness.engine.cluster.peers["peer-c"].blocked == set()
    host_b = harness.engine.cluster.hosts[harness.host_id("b")]
    assert host_b.unreachable_reporters == set()
    assert host_b.corrupt_reporters == set()


def test_a_seed_is_asked_without_the_first_requesters_timeout() -> None:
    """A `dfget --timeout 30s` first in line bounded the seed's download for the whole swarm."""
    harness = Harness()
    swarm_with_seed(harness)
    (trigger,) = of_type(harness.register("peer-a", "a", timeout_s=30.0), TriggerSeedPeer)
    assert trigger.download.timeout_s == 0.0


def test_a_seed_that_accepted_but_never_registered_counts_as_failed() -> None:
    """It crashed, or registered with another scheduler: the task was left 'seed on its way' for ever
    (no seed again, no replacement of a lost source, every child waiting out its attempts)."""
    harness = Harness()
    swarm_with_seed(harness)
    assert of_type(harness.register("peer-a", "a"), TriggerSeedPeer)
    harness.advance(19)
    task = harness.engine.cluster.tasks["task-1"]
    assert task.seed_trigger_pending
    harness.advance(2)
    assert not task.seed_trigger_pending
    assert task.seed_failed_at == 20.0
