"""The flush step of a group commit, in a thread of its own: fsync new directories, fdatasync task files.

Why a second thread: on a busy disk one fdatasync took 200–400 ms (8 daemons and their dfget outputs on
one VM disk). Run by the writer thread, it held every piece write queued behind it, so a piece became
available, and was announced to children, that much later: ~30 % of pieces waited 100–400 ms.

Rules:
- The writer thread still owns pwrite, SQLite and all task state. It builds a `SyncJob` (the commit's
  dirty tasks, a snapshot of their pending records, their finish waiters, duplicates of their fds, the
  new directories), hands it to the `Syncer`, and goes on writing. The job comes back on the writer's
  own queue; the writer then records, in one SQLite transaction, only the snapshot's records still
  pending with the same digest (a record forgotten or replaced meanwhile is not recorded).
- A job touches nothing but its own fds and directory paths, and closes its fds whatever happens.
- One job at a time: the writer starts the next commit only after the last one came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfly.daemon.storage.files import fsync_dir
from dfly.daemon.storage.model import WriterTask


@dataclass(eq=False)
class SyncFile:
    """One dirty task file of a job: its records as they were when the job was built."""

    task: WriterTask
    fd: int  # a duplicate of the writer's fd: a deletion meanwhile cannot close or reuse it
    records: dict[int, int]  # number -> digest
    error: OSError | None = None


@dataclass(eq=False)
class SyncJob:
    """What one group commit flushes; `run` fills in the errors."""

    tasks: list[WriterTask]  # every dirty task of the commit (records, a new task, headers, finishing)
    files: list[SyncFile]
    dirs: list[Path]
    waiters: dict[str, list[asyncio.Future[Any]]]  # task id -> finish waiters this commit resolves
    dir_error: OSError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """Flush directories first (a new file's name), then every file; never raises."""
        try:
            for directory in self.dirs:
                fsync_dir(directory)
        except OSError as exc:
            self.dir_error = exc
        else:
            for file in self.files:
                try:
                    os.fdatasync(file.fd)
                except OSError as exc:
                    file.error = exc
        finally:
            self.close()
            self.done.set()

    def close(self) -> None:
        for file in self.files:
            if file.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(file.fd)
                file.fd = -1


class Syncer:
    """A daemon thread running one `SyncJob` at a time and handing each back through `deliver`."""

    def __init__(self, deliver: Callable[[SyncJob], None]) -> None:
        self._deliver = deliver
        self._jobs: queue.SimpleQueue[SyncJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="dfly-storage-sync", daemon=True)

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: SyncJob) -> None:
        self._jobs.put(job)

    def stop(self, *, wait: bool = True) -> None:
        """End the thread after the jobs already submitted (the writer waits for those itself)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            if wait:
                self._thread.join()

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()
            self._deliver(job)
