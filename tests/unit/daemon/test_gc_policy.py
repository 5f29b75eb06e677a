"""plan_evictions: TTL expiry, LRU eviction under disk pressure down to the low mark, tasks in use kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfly.daemon.core.gc_policy import (
    CachedTask,
    DiskUsage,
    Eviction,
    GcPolicy,
    can_make_room,
    plan_evictions,
)

POLICY = GcPolicy(task_ttl_s=100.0, high_percent=80.0, low_percent=60.0)
MB = 1_000_000


def task(task_id: str, size_mb: int, last_used: float, *, in_use: bool = False) -> CachedTask:
    return CachedTask(task_id, size_mb * MB, last_used, in_use)


def test_nothing_to_do_below_the_high_mark_and_within_the_ttl() -> None:
    tasks = [task("a", 10, 50.0), task("b", 10, 60.0)]
    assert plan_evictions(tasks, DiskUsage(100 * MB, 79 * MB), now=120.0, policy=POLICY) == []


def test_a_task_unused_for_the_ttl_expires_even_without_pressure() -> None:
    tasks = [task("old", 5, 19.0), task("edge", 5, 20.0), task("recent", 5, 21.0)]
    got = plan_evictions(tasks, DiskUsage(100 * MB, 15 * MB), now=120.0, policy=POLICY)
    assert got == [Eviction("old", 5 * MB, "expired"), Eviction("edge", 5 * MB, "expired")]


def test_room_can_be_made_only_from_tasks_not_in_use() -> None:
    tasks = [task("a", 30, 10.0), task("b", 30, 20.0, in_use=True)]
    disk = DiskUsage(100 * MB, 80 * MB)  # 20 MB of other files
    assert can_make_room(tasks, disk, 50 * MB)  # 80 - 30 + 50 = 100: just fits
    assert not can_make_room(tasks, disk, 50 * MB + 1)
    assert not can_make_room([], DiskUsage(100 * MB, 0), 10**15)  # a Content-Length no disk holds


def test_pressure_evicts_least_recently_used_until_the_low_mark() -> None:
    # 90 % used: 30 MB must go to reach 60 %; oldest first: c (20 MB), then a (15 MB) -> 35 MB freed
    tasks = [task("a", 15, 50.0), task("b", 25, 90.0), task("c", 20, 40.0), task("d", 30, 95.0)]
    got = plan_evictions(tasks, DiskUsage(100 * MB, 90 * MB), now=100.0, policy=POLICY)
    assert [(e.task_id, e.reason) for e in got] == [("c", "disk_pressure"), ("a", "disk_pressure")]


def test_expired_tasks_count_toward_the_pressure_target() -> None:
    # 85 % used; "old" (20 MB) expires, leaving 65 %: below the high mark, nothing else goes
    tasks = [task("old", 20, 0.0), task("new", 40, 190.0)]
    got = plan_evictions(tasks, DiskUsage(100 * MB, 85 * MB), now=200.0, policy=POLICY)
    assert got == [Eviction("old", 20 * MB, "expired")]


def test_tasks_in_use_are_never_evicted() -> None:
    tasks = [task("busy", 50, 0.0, in_use=True), task("idle", 10, 150.0)]
    got = plan_evictions(tasks, DiskUsage(100 * MB, 95 * MB), now=200.0, policy=POLICY)
    assert got == [Eviction("idle", 10 * MB, "disk_pressure")]  # not enough, but all that may go


def test_usage_from_other_files_is_part_of_the_filesystem_figure() -> None:
    # the disk is 85 % full, dfly holds only 10 MB of it: all of dfly's evictable tasks go
    tasks = [task("a", 4, 10.0), task("b", 6, 20.0)]
    got = plan_evictions(tasks, DiskUsage(100 * MB, 85 * MB), now=30.0, policy=POLICY)
    assert [e.task_id for e in got] == ["a", "b"]


def test_ties_in_last_use_break_by_task_id() -> None:
    tasks = [task("z", 30, 5.0), task("m", 30, 5.0), task("a", 30, 5.0)]  # 95 %: 35 MB must go
    got = plan_evictions(tasks, DiskUsage(100 * MB, 95 * MB), now=10.0, policy=POLICY)
    assert [e.task_id for e in got] == ["a", "m"]


def test_a_zero_capacity_means_no_pressure() -> None:
    assert plan_evictions([task("a", 1, 0.0)], DiskUsage(0, 0), now=1.0, policy=POLICY) == []


@pytest.mark.parametrize(("ttl", "high", "low"), [(0.0, 80.0, 60.0), (1.0, 60.0, 60.0), (1.0, 101.0, 60.0)])
def test_bad_policies_are_refused(ttl: float, high: float, low: float) -> None:
    with pytest.raises(ValueError, match=r"must be positive|low_percent < high_percent"):
        GcPolicy(task_ttl_s=ttl, high_percent=high, low_percent=low)


@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 1000), st.booleans()),
        min_size=0,
        max_size=12,
        unique_by=None,
    ),
    st.integers(0, 400),
)
def test_properties(entries: list[tuple[int, int, bool]], other_mb: int) -> None:
    tasks = [
        task(f"t{i:02d}", size, float(used), in_use=busy) for i, (size, used, busy) in enumerate(entries)
    ]
    used = sum(t.size_bytes for t in tasks) + other_mb * MB
    disk = DiskUsage(max(used, 1) + 100 * MB, used)
    now = 1000.0
    got = plan_evictions(tasks, disk, now, POLICY)
    by_id = {t.task_id: t for t in tasks}
    ids = [e.task_id for e in got]
    assert len(ids) == len(set(ids))  # each task at most once
    assert all(not by_id[i].in_use for i in ids)  # never a task in use
    left = disk.used_bytes - sum(e.size_bytes for e in got)
    pressured = [e for e in got if e.reason == "disk_pressure"]
    if pressured:  # each pressure eviction was needed when it was made: usage above the low mark before it
        before_last = left + pressured[-1].size_bytes
        assert 100 * before_last > POLICY.low_percent * disk.capacity_bytes
        # and the ones it skipped were used more recently than every one it took
        taken = {e.task_id for e in pressured}
        kept = [
            t
            for t in tasks
            if not t.in_use and t.task_id not in taken and now - t.last_used < POLICY.task_ttl_s
        ]
        assert all(by_id[i].last_used <= k.last_used for i in taken for k in kept)
    else:  # no pressure evictions: either below the high mark or nothing evictable left
        evictable_left = [t for t in tasks if not t.in_use and t.task_id not in set(ids)]
        assert 100 * left < POLICY.high_percent * disk.capacity_bytes or not evictable_left
