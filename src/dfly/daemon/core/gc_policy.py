"""Which cached tasks a daemon's storage GC evicts: a pure decision, no I/O, no clock.

Semantics follow Dragonfly's client GC (shared/reference/dragonfly.md §4.4):
- **TTL**: a task not used for `task_ttl_s` (now - last_used >= ttl) is evicted.
- **Disk pressure**: usage % = used · 100 / capacity. When it is at or above `high_percent` after the
  TTL evictions, the least recently used tasks go, oldest first, until the bytes freed reach
  used - low_percent · capacity (usage falls to `low_percent`), or nothing evictable is left.
  Capacity is the filesystem's (used = total - available) or, with a quota, the quota (used = the
  bytes of dfly's own task files), so other files on a shared disk neither trigger nor block it.
- A task in use (a download running, a dfget or proxy response reading it, a child connected to it)
  is never evicted; partial tasks not in use are evictable like finished ones.
- Ties in last use are broken by task id, so a decision is a function of its inputs alone.
- Before a new task file is admitted, eviction happens only if it can make room: when the file would
  not fit even with every task not in use gone (a Content-Length larger than the disk, or a lying
  one), nothing is evicted (`can_make_room`) and the admission fails on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CachedTask:
    task_id: str
    size_bytes: int  # bytes its file takes (task files are preallocated: the content length)
    last_used: float  # seconds, same clock as `now`
    in_use: bool


@dataclass(frozen=True, slots=True)
class DiskUsage:
    capacity_bytes: int  # the filesystem's size, or the quota
    used_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.used_bytes / self.capacity_bytes if self.capacity_bytes > 0 else 0.0


@dataclass(frozen=True, slots=True)
class GcPolicy:
    task_ttl_s: float
    high_percent: float
    low_percent: float

    def __post_init__(self) -> None:
        if self.task_ttl_s <= 0:
            raise ValueError("task_ttl_s must be positive")
        if not 0 <= self.low_percent < self.high_percent <= 100:
            raise ValueError("need 0 <= low_percent < high_percent <= 100")


@dataclass(frozen=True, slots=True)
class Eviction:
    task_id: str
    size_bytes: int
    reason: str  # "expired" | "disk_pressure"


def can_make_room(tasks: list[CachedTask], disk: DiskUsage, incoming_bytes: int) -> bool:
    """Would `incoming_bytes` fit within the capacity once every task not in use is gone?"""
    evictable = sum(t.size_bytes for t in tasks if not t.in_use)
    return disk.used_bytes - evictable + incoming_bytes <= disk.capacity_bytes


def plan_evictions(tasks: list[CachedTask], disk: DiskUsage, now: float, policy: GcPolicy) -> list[Eviction]:
    """The tasks to evict now, expired ones first, then least recently used ones under pressure."""
    free_of_use = sorted((t for t in tasks if not t.in_use), key=lambda t: (t.last_used, t.task_id))
    evictions = [
        Eviction(t.task_id, t.size_bytes, "expired")
        for t in free_of_use
        if now - t.last_used >= policy.task_ttl_s
    ]
    used = disk.used_bytes - sum(e.size_bytes for e in evictions)
    if disk.capacity_bytes <= 0 or 100.0 * used < policy.high_percent * disk.capacity_bytes:
        return evictions
    to_free = used - policy.low_percent * disk.capacity_bytes / 100.0
    gone = {e.task_id for e in evictions}
    for task in free_of_use:
        if to_free <= 0:
            break
        if task.task_id in gone:
            continue
        evictions.append(Eviction(task.task_id, task.size_bytes, "disk_pressure"))
        to_free -= task.size_bytes
    return evictions
