"""AnnounceHost's finished tasks go in runs of at most ANNOUNCE_CHUNK_BYTES, taken from their source only
as each run is built (so building a big cache's list does not hold the event loop at once); a host
with no finished task is still announced, with an empty run."""

from __future__ import annotations

from collections.abc import Iterator

from dfly.api import scheduler_pb2 as pb
from dfly.daemon.scheduler_client import ANNOUNCE_CHUNK_BYTES, announce_chunks


def task(n: int) -> pb.FinishedTask:
    digests = range(2**31, 2**31 + 200)  # 5 bytes each: ~1 KB a task, 3 MB in all
    return pb.FinishedTask(task_id=f"t{n:05}", peer_id=f"h-stored-t{n:05}", piece_digests=digests)


def test_runs_stay_under_the_bound_and_hold_every_task_once() -> None:
    runs = list(announce_chunks(task(n) for n in range(3000)))
    assert len(runs) > 1
    assert all(sum(t.ByteSize() + 8 for t in run) <= ANNOUNCE_CHUNK_BYTES for run in runs)
    assert [t.task_id for run in runs for t in run] == [f"t{n:05}" for n in range(3000)]


def test_the_source_is_read_only_as_runs_are_built() -> None:
    taken = 0

    def source() -> Iterator[pb.FinishedTask]:
        nonlocal taken
        for n in range(3000):
            taken += 1
            yield task(n)

    runs = announce_chunks(source())
    first = next(runs)
    assert taken == len(first) + 1  # the one that did not fit waits for the next run


def test_a_host_with_nothing_held_is_announced_once_with_no_task() -> None:
    assert list(announce_chunks(iter(()))) == [[]]
