"""The daemon's storage GC: evicts cached tasks by TTL and disk pressure (decisions in core/gc_policy.py).

Rules:
- A pass runs every `gc.interval_s`. A new task file of n bytes is created inside `admit(n)`: its
  bytes count as used from then until the file exists (so do those of every other admission still
  creating its file: the layers of one image arrive at once), and a pass runs first if they would
  bring usage to the high mark; it returns once the evicted files are deleted, so a download evicts
  old tasks instead of failing for space. Passes run one at a time, and an admission looks again once
  it has the turn (several would otherwise each evict down to the low mark from the same stale usage).
- A caller cancelled while a pass waits for its deletions does not cancel them.
- Usage is the filesystem's of `storage.dir` as `df` shows it (used / (used + available to users);
  blocks reserved for root count as neither), or with `gc.disk_quota_bytes` the task files' bytes out
  of that quota.
- Evicting goes through `TaskManager.remove`: forgotten first (nothing new attaches), file deleted,
  every connected scheduler told. Tasks in use are never chosen (see tasks.py).
- The last use survives restarts as the task file's mtime: each pass, and `stamp()` at a clean stop,
  sets the mtime of tasks used since their last stamp (`os.utime`), so the TTL counts from the last use,
  not from the last restart. A task file with other hard links (`dfget --force-hard-link`: the user's
  output shares it) is left alone.
- A pass that fails is logged and the next one runs; the loop never ends on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from dfly.common.errors import StorageError
from dfly.daemon.config import GcSection
from dfly.daemon.context import Counters
from dfly.daemon.core.gc_policy import (
    CachedTask,
    DiskUsage,
    Eviction,
    GcPolicy,
    can_make_room,
    plan_evictions,
)

log = logging.getLogger(__name__)


class GcTasks(Protocol):
    """What the GC needs of the TaskManager."""

    def cached_tasks(self) -> list[CachedTask]: ...

    def remove(self, task_id: str) -> asyncio.Task[None] | None:
        """Forget the task; the returned asyncio task deletes its file (None: unknown task)."""


class GcStorage(Protocol):
    """What the GC needs of Storage."""

    @property
    def root(self) -> Path: ...

    def task_path(self, task_id: str) -> Path: ...

    def stored_bytes(self) -> int:
        """The task files' bytes (their content lengths: files are preallocated)."""


class StorageGC:
    def __init__(
        self,
        config: GcSection,
        storage: GcStorage,
        tasks: GcTasks,
        counters: Counters,
        clock: Callable[[], float] = time.time,
        filesystem_usage: Callable[[Path], DiskUsage] | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.tasks = tasks
        self.counters = counters
        self.clock = clock
        self._filesystem_usage = filesystem_usage or filesystem_usage_of
        self.policy = GcPolicy(
            task_ttl_s=config.task_ttl_s,
            high_percent=config.disk_high_threshold_percent,
            low_percent=config.disk_low_threshold_percent,
        )
        self._stamped: dict[str, float] = {}  # task id -> last use written as its file's mtime
        self._turn = asyncio.Lock()  # one pass at a time
        self._reserved = 0  # bytes of task files being created (admit)

    def loaded_from_mtimes(self) -> None:
        """The tasks held now took their last use from their files' mtimes (at start): nothing to stamp
        until they are used (else the first pass stats and stamps every file: 0.7 s at 50,000 tasks)."""
        self._stamped = {task.task_id: task.last_used for task in self.tasks.cached_tasks()}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)  # the GC's period, not a wait for an event
            try:
                await self.run_once()
            except Exception:
                log.exception("storage GC pass failed")

    async def run_once(self, incoming_bytes: int = 0) -> list[Eviction]:
        """One pass: stamp last uses, evict what the policy picks (`incoming_bytes` count as used); returns
        once the evicted tasks' files are deleted."""
        async with self._turn:
            return await self._pass(incoming_bytes)

    @contextlib.asynccontextmanager
    async def admit(self, nbytes: int) -> AsyncIterator[None]:
        """Around creating a task file of `nbytes`: room is made first, and its bytes count as used until
        the block ends (by then the preallocated file counts itself). With a quota, a task that could not
        fit in it even with every task not in use evicted is refused (StorageError): the disk itself
        would take it, so nothing else stops it, and the next pass would evict it and the whole cache."""
        quota = self.config.disk_quota_bytes
        # O(1) first; the check over every task only near the high mark
        if quota and not self._fits(nbytes) and not self._could_fit(nbytes):
            raise StorageError(
                f"a task of {nbytes} bytes cannot fit in gc.disk_quota_bytes ({quota}) even with every "
                "task not in use evicted"
            )
        self._reserved += nbytes
        try:
            await self.make_room(0)  # this admission's bytes are among the reserved ones
            yield
        finally:
            self._reserved -= nbytes

    async def make_room(self, nbytes: int) -> None:
        """Evict if `nbytes` more (besides the admissions' reserved bytes) would reach the high mark."""
        try:
            if self._fits(nbytes):
                return  # the usual case: no pass over every task for each new one
            async with self._turn:
                if not self._fits(nbytes):  # a pass that ran meanwhile may have made the room
                    await self._pass(nbytes + self._reserved)
        except Exception:
            log.exception("storage GC pass before admitting %d bytes failed", nbytes)

    def stamp(self) -> None:
        """Write every task's last use as its file's mtime (at a clean stop)."""
        self._stamp(self.tasks.cached_tasks())

    def _could_fit(self, nbytes: int) -> bool:
        try:
            return can_make_room(self.tasks.cached_tasks(), self.usage(), self._reserved + nbytes)
        except Exception:
            log.exception("storage GC could not check an admission of %d bytes", nbytes)
            return True

    def _fits(self, nbytes: int) -> bool:
        usage = self.usage()
        used = usage.used_bytes + self._reserved + nbytes
        return 100.0 * used < self.policy.high_percent * usage.capacity_bytes

    async def _pass(self, incoming_bytes: int) -> list[Eviction]:
        self.counters.gc_passes += 1
        cached = self.tasks.cached_tasks()
        self._stamp(cached)
        usage = self.usage()
        if incoming_bytes and not can_make_room(cached, usage, incoming_bytes):
            log.warning(
                "storage GC: new task files of %d bytes cannot fit in %d bytes (%d used) even with every "
                "task not in use evicted; nothing evicted",
                incoming_bytes,
                usage.capacity_bytes,
                usage.used_bytes,
            )
            return []
        if incoming_bytes:
            usage = DiskUsage(usage.capacity_bytes, usage.used_bytes + incoming_bytes)
        evictions = plan_evictions(cached, usage, self.clock(), self.policy)
        deletions = []
        for eviction in evictions:
            deletion = self.tasks.remove(eviction.task_id)
            if deletion is not None:
                deletions.append(deletion)
                self._stamped.pop(eviction.task_id, None)
                self.counters.evicted(eviction.reason, eviction.size_bytes)
        if evictions:
            after = usage.used_bytes - sum(e.size_bytes for e in evictions)
            log.info(
                "storage GC evicted %d tasks (%d bytes: %s); usage %.1f%% -> %.1f%% of %d bytes",
                len(evictions),
                sum(e.size_bytes for e in evictions),
                ", ".join(sorted({e.reason for e in evictions})),
                usage.percent,
                100.0 * after / usage.capacity_bytes if usage.capacity_bytes else 0.0,
                usage.capacity_bytes,
            )
        if deletions:
            await asyncio.wait(deletions)  # unlike gather, a cancelled caller leaves them running
        return evictions

    def usage(self) -> DiskUsage:
        """The filesystem's usage, or the task files' bytes against the quota."""
        quota = self.config.disk_quota_bytes
        if quota:
            return DiskUsage(quota, self.storage.stored_bytes())
        return self._filesystem_usage(self.storage.root)

    def _stamp(self, cached: list[CachedTask]) -> None:
        stamped: dict[str, float] = {}  # only tasks still cached: removed ones (any way) drop out
        for task in cached:
            if self._stamped.get(task.task_id) == task.last_used:
                stamped[task.task_id] = task.last_used
                continue
            path = self.storage.task_path(task.task_id)
            try:
                if os.stat(path).st_nlink == 1:
                    os.utime(path, (task.last_used, task.last_used))
            except OSError:
                continue  # no file (a task that never started): nothing to stamp
            stamped[task.task_id] = task.last_used
        self._stamped = stamped


def filesystem_usage_of(path: Path) -> DiskUsage:
    """Usage of the filesystem holding `path`, as `df` shows it."""
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return DiskUsage(used + st.f_bavail * st.f_frsize, used)
