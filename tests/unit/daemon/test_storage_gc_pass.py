"""StorageGC's pass over a real directory: last uses stamped as mtimes, quota usage, eviction counters.

The task manager is a stand-in at the GC's edge (GcTasks); files, mtimes and statvfs are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from dfly.common.errors import StorageError
from dfly.daemon.config import GcSection
from dfly.daemon.context import Counters
from dfly.daemon.core.gc_policy import CachedTask, DiskUsage
from dfly.daemon.gc import StorageGC

MB = 1_000_000


class Files:
    def __init__(self, root: Path, tasks: Tasks) -> None:
        self.root = root
        self.tasks = tasks

    def task_path(self, task_id: str) -> Path:
        return self.root / task_id

    def stored_bytes(self) -> int:
        """As the real storage: a task's bytes count until its file is deleted, after remove()."""
        return sum(size for task_id, size in self.tasks.sizes.items() if (self.root / task_id).exists())


class Tasks:
    def __init__(self, cached: list[CachedTask], root: Path) -> None:
        self.cached = cached
        self.sizes = {task.task_id: task.size_bytes for task in cached}
        self.root = root
        self.removed: list[str] = []

    def cached_tasks(self) -> list[CachedTask]:
        return list(self.cached)

    def remove(self, task_id: str) -> asyncio.Task[None] | None:
        if task_id not in {t.task_id for t in self.cached}:
            return None
        self.cached = [t for t in self.cached if t.task_id != task_id]
        self.removed.append(task_id)

        async def delete() -> None:
            await asyncio.sleep(0)  # the writer thread takes its turn: the file goes a moment later
            (self.root / task_id).unlink()

        return asyncio.get_running_loop().create_task(delete())


def make_gc(
    tmp_path: Path, cached: list[CachedTask], now: float, **gc: float
) -> tuple[StorageGC, Tasks, Counters]:
    for task in cached:
        (tmp_path / task.task_id).write_bytes(b"x")
    tasks, counters = Tasks(cached, tmp_path), Counters()
    config = GcSection.model_validate(gc)
    return StorageGC(config, Files(tmp_path, tasks), tasks, counters, clock=lambda: now), tasks, counters


def test_last_uses_are_stamped_as_mtimes_except_on_hard_linked_files(tmp_path: Path) -> None:
    cached = [
        CachedTask("idle", MB, 1_000_000.0, False),
        CachedTask("busy", MB, 1_000_500.0, True),
        CachedTask("linked", MB, 1_000_300.0, False),
    ]
    gc, tasks, counters = make_gc(tmp_path, cached, now=1_000_600.0)
    os.link(tmp_path / "linked", tmp_path / "users-output")  # dfget --force-hard-link
    linked_mtime = os.stat(tmp_path / "linked").st_mtime
    assert asyncio.run(gc.run_once()) == []
    assert os.stat(tmp_path / "idle").st_mtime == 1_000_000.0  # survives a restart: TTL from last use
    assert os.stat(tmp_path / "busy").st_mtime == 1_000_500.0
    assert os.stat(tmp_path / "users-output").st_mtime == linked_mtime  # the user's file is not touched
    assert counters.gc_passes == 1
    assert tasks.removed == []
    tasks.cached = [CachedTask("idle", MB, 1_000_700.0, False)]  # used again; stamped at a clean stop
    gc.stamp()
    assert os.stat(tmp_path / "idle").st_mtime == 1_000_700.0
    # "busy" and "linked" left without an eviction (a failed digest, a lost file): not remembered
    assert set(gc._stamped) == {"idle"}


def test_tasks_loaded_from_their_mtimes_are_not_stamped_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = [CachedTask(f"t{n}", MB, 1_000_000.0 + n, False) for n in range(3)]
    gc, tasks, _ = make_gc(tmp_path, cached, now=1_000_600.0)
    for task in cached:  # as after a restart: last use read from each file's mtime
        os.utime(tmp_path / task.task_id, (task.last_used, task.last_used))
    gc.loaded_from_mtimes()
    touched: list[str] = []
    monkeypatch.setattr(os, "utime", lambda path, times: touched.append(str(path)))
    asyncio.run(gc.run_once())
    assert touched == []  # no file stamped: nothing was used since
    tasks.cached = [CachedTask("t1", MB, 1_000_550.0, False), *cached[::2]]  # t1 used again
    asyncio.run(gc.run_once())
    assert touched == [str(tmp_path / "t1")]


def test_a_quota_counts_only_task_bytes_and_evicts_least_recently_used(tmp_path: Path) -> None:
    cached = [
        CachedTask("old", 40 * MB, 10.0, False),
        CachedTask("mid", 30 * MB, 20.0, False),
        CachedTask("new", 20 * MB, 30.0, False),
    ]
    gc, _tasks, counters = make_gc(tmp_path, cached, now=40.0, disk_quota_bytes=100 * MB)
    assert gc.usage().percent == pytest.approx(90.0)
    evicted = asyncio.run(gc.run_once())
    assert [e.task_id for e in evicted] == ["old"]  # 90 % -> 50 %, under the 60 % mark
    assert not (tmp_path / "old").exists()  # deleted before the pass returned
    assert (counters.gc_evicted_tasks, counters.gc_evicted_bytes) == (1, 40 * MB)


def test_make_room_counts_the_incoming_bytes(tmp_path: Path) -> None:
    cached = [CachedTask("a", 30 * MB, 10.0, False), CachedTask("b", 30 * MB, 20.0, False)]
    gc, tasks, _ = make_gc(tmp_path, cached, now=30.0, disk_quota_bytes=100 * MB)
    asyncio.run(gc.make_room(10 * MB))  # 70 %: below the high mark
    assert tasks.removed == []
    assert gc.counters.gc_passes == 0  # not even a pass over the tasks
    asyncio.run(gc.make_room(30 * MB))  # 90 %: down to 60 % needs 30 MB gone
    assert tasks.removed == ["a"]


def test_an_admission_that_cannot_fit_evicts_nothing(tmp_path: Path) -> None:
    """A Content-Length beyond what the disk could ever hold (a lying origin) fails on its own instead
    of first wiping the cache."""
    cached = [CachedTask("a", 30 * MB, 10.0, False), CachedTask("b", 30 * MB, 20.0, True)]
    gc, tasks, counters = make_gc(tmp_path, cached, now=30.0, disk_quota_bytes=100 * MB)
    asyncio.run(gc.make_room(71 * MB))  # 30 MB stay in use: 71 MB can never fit in 100 MB
    assert tasks.removed == []
    assert counters.gc_evicted_tasks == 0
    asyncio.run(gc.make_room(70 * MB))  # fits once "a" is gone
    assert tasks.removed == ["a"]


def test_with_a_quota_a_task_that_can_never_fit_is_refused(tmp_path: Path) -> None:
    """The disk takes it, so nothing else stopped it: a 60 MB task under a 50 MB quota was stored, and
    the next pass evicted it along with the rest of the cache."""
    cached = [CachedTask("a", 20 * MB, 10.0, False), CachedTask("b", 20 * MB, 20.0, True)]
    gc, tasks, _ = make_gc(tmp_path, cached, now=30.0, disk_quota_bytes=100 * MB)

    async def admit(nbytes: int) -> None:
        async with gc.admit(nbytes):
            pass

    with pytest.raises(StorageError, match=r"cannot fit in gc\.disk_quota_bytes"):
        asyncio.run(admit(81 * MB))  # b stays in use: 81 MB can never fit
    assert tasks.removed == []
    asyncio.run(admit(80 * MB))
    assert tasks.removed == ["a"]


def test_an_admission_far_from_the_mark_looks_at_no_task(tmp_path: Path) -> None:
    """Each new download is admitted: with tens of thousands of cached tasks, a look at every one of them
    per admission held the loop ~60 ms. Below the high mark there is nothing to look for."""
    cached = [CachedTask(f"t{n}", MB, float(n), False) for n in range(10)]
    gc, tasks, _ = make_gc(tmp_path, cached, now=30.0, disk_quota_bytes=100 * MB)
    looked: list[int] = []
    listed = tasks.cached_tasks

    def counting() -> list[CachedTask]:
        looked.append(1)
        return listed()

    tasks.cached_tasks = counting  # type: ignore[method-assign]

    async def admit(nbytes: int) -> None:
        async with gc.admit(nbytes):
            pass

    asyncio.run(admit(5 * MB))  # 15 % of the quota: far below the 80 % mark
    assert looked == []
    asyncio.run(admit(75 * MB))  # 85 %: near the mark, now it looks (and evicts)
    assert looked
    assert tasks.removed


def test_admissions_at_once_evict_once_not_each_down_to_the_low_mark(tmp_path: Path) -> None:
    cached = [
        CachedTask("a", 30 * MB, 10.0, False),
        CachedTask("b", 30 * MB, 20.0, False),
        CachedTask("c", 30 * MB, 30.0, False),
    ]
    _, tasks, counters = make_gc(tmp_path, cached, now=40.0)
    files = Files(tmp_path, tasks)
    lagging = lambda _root: DiskUsage(100 * MB, files.stored_bytes())  # noqa: E731 - statvfs lags behind remove()
    gc = StorageGC(GcSection(), files, tasks, counters, clock=lambda: 40.0, filesystem_usage=lagging)

    async def three_layers() -> None:
        await asyncio.gather(gc.make_room(5 * MB), gc.make_room(5 * MB), gc.make_room(5 * MB))

    asyncio.run(three_layers())  # 95 %: a and b go; the others then find room
    assert tasks.removed == ["a", "b"]


def test_admissions_count_each_other_until_their_files_exist(tmp_path: Path) -> None:
    """Two 15 MB task files created at once next to 60 MB: each alone fits under the 80 % mark, both
    together do not, so the second admission evicts (before, both saw 75 % and the disk reached 90 %)."""
    cached = [CachedTask("old", 60 * MB, 10.0, False)]
    gc, tasks, counters = make_gc(tmp_path, cached, now=40.0, disk_quota_bytes=100 * MB)

    async def two_layers() -> None:
        created = asyncio.Event()

        async def layer() -> None:
            async with gc.admit(15 * MB):
                await created.wait()  # the file is still being created

        first = asyncio.ensure_future(layer())
        await asyncio.sleep(0)  # the first admission holds its 15 MB
        assert tasks.removed == []
        second = asyncio.ensure_future(layer())
        await asyncio.sleep(0)
        created.set()
        await asyncio.gather(first, second)

    asyncio.run(two_layers())
    assert tasks.removed == ["old"]
    passes = counters.gc_passes

    async def after() -> None:
        async with gc.admit(70 * MB):  # 70 % of the now empty quota: fits, if nothing is still reserved
            pass

    asyncio.run(after())
    assert counters.gc_passes == passes


def test_a_cancelled_admission_leaves_its_deletions_running(tmp_path: Path) -> None:
    cached = [CachedTask("a", 90 * MB, 10.0, False)]
    gc, tasks, _ = make_gc(tmp_path, cached, now=40.0, disk_quota_bytes=100 * MB)

    async def cancelled() -> None:
        admission = asyncio.ensure_future(gc.make_room(5 * MB))
        await asyncio.sleep(0)  # the pass has removed "a" and waits for its file's deletion
        admission.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await admission
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:  # the deletions, if they survived the cancellation and are still running
            await asyncio.wait(others)

    asyncio.run(cancelled())
    assert tasks.removed == ["a"]
    assert not (tmp_path / "a").exists()


def test_without_a_quota_the_filesystem_is_measured_as_df_does(tmp_path: Path) -> None:
    gc, _tasks, _ = make_gc(tmp_path, [], now=0.0)
    usage = gc.usage()
    df = subprocess.run(["df", "--output=used,avail", "-B1", str(tmp_path)], capture_output=True, text=True)
    used, avail = (int(field) for field in df.stdout.split()[-2:])
    # df's Use% (blocks reserved for root are neither used nor available); files may come and go meanwhile
    assert abs(usage.used_bytes - used) < 64 * MB
    assert abs(usage.capacity_bytes - (used + avail)) < 64 * MB


def test_a_failing_pass_before_admission_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gc, tasks, _ = make_gc(tmp_path, [], now=0.0, disk_quota_bytes=MB)  # MB more is 100 %: a pass runs

    def broken() -> list[CachedTask]:
        raise RuntimeError("boom")

    tasks.cached_tasks = broken  # type: ignore[method-assign]
    asyncio.run(gc.make_room(MB))
    assert "storage GC pass before admitting" in caplog.text
