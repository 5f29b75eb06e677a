"""What every download of a daemon shares: config, identity, storage, scheduler link, buffers, counters.

Counters are kept twice on purpose: as Prometheus metrics (`dfly_daemon_*`, port 4002) and as plain
numbers for the local API's `stats` reply, which the demo and tests read.
"""

from __future__ import annotations

import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from prometheus_client import Counter

from dfly.daemon.config import DaemonConfig
from dfly.daemon.scheduler_ring import SchedulerRing
from dfly.daemon.storage import Storage
from dfly.daemon.transfer.buffers import BufferPool


@contextlib.asynccontextmanager
async def _no_gc() -> AsyncIterator[None]:
    yield


SOURCES = ("back_to_source", "remote_seed", "remote_peer", "local_peer")

_DOWNLOAD_BYTES = Counter(
    "dfly_daemon_download_bytes", "Bytes downloaded, by where they came from", ["source"]
)
_UPLOAD_BYTES = Counter("dfly_daemon_upload_bytes", "Bytes uploaded to other peers")
_TASKS = Counter(
    "dfly_daemon_download_tasks",
    "Download attempts of a task (from parents or the origin) that ended, by result; a request served "
    "from a task held complete (a cache hit) is none",
    ["result"],
)
_GC_TASKS = Counter("dfly_daemon_gc_evicted_tasks", "Tasks the storage GC evicted, by reason", ["reason"])
_GC_BYTES = Counter("dfly_daemon_gc_evicted_bytes", "Bytes of task files the storage GC evicted", ["reason"])
# Every series exists from the start at 0: rate() of a series that does not exist yet is empty, so a
# ratio such as back_to_source / total would show nothing instead of 0.
for _source in SOURCES:
    _DOWNLOAD_BYTES.labels(source=_source)
for _result in ("succeeded", "failed"):
    _TASKS.labels(result=_result)
for _reason in ("expired", "disk_pressure"):
    _GC_TASKS.labels(reason=_reason)
    _GC_BYTES.labels(reason=_reason)


@dataclass
class Counters:
    download_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    upload_bytes: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    gc_passes: int = 0
    gc_evicted_tasks: int = 0
    gc_evicted_bytes: int = 0

    def downloaded(self, source: str, nbytes: int) -> None:
        self.download_bytes[source] += nbytes
        _DOWNLOAD_BYTES.labels(source=source).inc(nbytes)

    def uploaded(self, nbytes: int) -> None:
        self.upload_bytes += nbytes
        _UPLOAD_BYTES.inc(nbytes)

    def task_ended(self, ok: bool) -> None:
        if ok:
            self.tasks_succeeded += 1
        else:
            self.tasks_failed += 1
        _TASKS.labels(result="succeeded" if ok else "failed").inc()

    def stats(self) -> dict[str, object]:
        """The counters as the local API's `stats` shows them."""
        return {
            "download_bytes": dict(self.download_bytes),
            "upload_bytes": self.upload_bytes,
            "tasks_succeeded": self.tasks_succeeded,
            "tasks_failed": self.tasks_failed,
            "gc": {
                "passes": self.gc_passes,
                "evicted_tasks": self.gc_evicted_tasks,
                "evicted_bytes": self.gc_evicted_bytes,
            },
        }

    def evicted(self, reason: str, nbytes: int) -> None:
        self.gc_evicted_tasks += 1
        self.gc_evicted_bytes += nbytes
        _GC_TASKS.labels(reason=reason).inc()
        _GC_BYTES.labels(reason=reason).inc(nbytes)


@dataclass
class DaemonContext:
    config: DaemonConfig
    host_id: str
    hostname: str
    ip: str
    seed: bool
    storage: Storage
    scheduler: SchedulerRing | None
    pool: BufferPool
    counters: Counters
    rng: random.Random
    piece_tls: ssl.SSLContext | None = None  # client side of `security.tls.pieces` (None = plain TCP)
    # Before a new task file of n bytes is created: let the storage GC evict for room (daemon/gc.py).
    # around creating a task file of n bytes (the storage GC's admit): room made, bytes reserved
    admit: Callable[[int], AbstractAsyncContextManager[None]] = field(default=lambda nbytes: _no_gc())
