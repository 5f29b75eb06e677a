"""Value types and layout rules of the daemon's storage (DESIGN.md §5).

- `TaskMeta` is what the storage knows of a task; `StoredTask` is a task as recovered at open: its meta,
  its *durable* piece records (one 8-byte slot per piece: the CRC-32, or MISSING), whether it was
  finished and its file's mtime.
- Layout under the storage dir: `tasks/{id[:3]}/{id}` (one preallocated file per task), `metadata.db`
  (SQLite in WAL mode), `clean-shutdown` (the marker written at a clean close) and `lock` (flock held
  while a Storage has the dir open, so two daemons never share one dir).
- Task ids become file names, so they are restricted to `[A-Za-z0-9_-]`, at least 3 characters.
"""

from __future__ import annotations

import asyncio
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfly.common.errors import StorageError
from dfly.common.pieces import piece_count
from dfly.daemon.core.task_state import MISSING as MISSING  # one convention: TaskState takes these over

TASKS_DIR = "tasks"
DB_NAME = "metadata.db"
CLEAN_MARKER = "clean-shutdown"
LOCK_NAME = "lock"

_TASK_ID = re.compile(r"[A-Za-z0-9_-]{3,200}")


@dataclass(frozen=True)
class TaskMeta:
    task_id: str
    url: str
    content_length: int
    piece_length: int
    response_headers: dict[str, str] = field(default_factory=dict)

    @property
    def piece_count(self) -> int:
        return piece_count(self.content_length, self.piece_length)

    def piece_span(self, number: int) -> tuple[int, int]:
        """(offset, length) of piece `number`; StorageError when out of range."""
        if number < 0 or number >= self.piece_count:
            raise StorageError(f"piece {number} out of range for task {short(self.task_id)}")
        offset = number * self.piece_length
        return offset, min(self.piece_length, self.content_length - offset)


@dataclass
class StoredTask:
    meta: TaskMeta
    digests: array[int]  # per piece its recorded CRC-32 or MISSING (array("q")); durable records only
    finished: bool
    mtime: float = 0.0  # of the task file, as recovery found it

    @property
    def held(self) -> int:
        """How many pieces are recorded."""
        return len(self.digests) - self.digests.count(MISSING)

    @property
    def pieces(self) -> dict[int, int]:
        """The recorded pieces, number -> digest (built at each call)."""
        return {n: d for n, d in enumerate(self.digests) if d != MISSING}


NO_PIECES: frozenset[int] = frozenset()  # one shared empty set (a set per task: 10 MiB at 50,000)


@dataclass
class WriterTask:
    """A task as the writer thread keeps it."""

    meta: TaskMeta
    recorded: PieceSet  # durable or pending records
    pending: dict[int, int] = field(default_factory=dict)  # number -> digest, not yet committed
    forgotten: frozenset[int] = NO_PIECES  # records to delete at the next commit (rarely any)
    headers_changed: bool = False  # the task record's response headers to update at the next commit
    in_db: bool = True  # the task record is in SQLite
    finish_waiters: list[asyncio.Future[Any]] = field(default_factory=list)

    def drop(self, numbers: Iterable[int]) -> int:
        """The pieces are no longer recorded: their pending records go; returns how many there were."""
        numbers = list(numbers)
        self.recorded.difference_update(numbers)
        return sum(self.pending.pop(n, None) is not None for n in numbers)


@dataclass
class Counters:
    """The writer thread's counters (written by that thread only; read anywhere for stats)."""

    commits: int = 0
    commit_errors: int = 0
    pieces_written: int = 0
    bytes_written: int = 0
    pieces_durable: int = 0
    write_errors: int = 0
    pending_records: int = 0


class PieceSet:
    """Which of a task's pieces are recorded: one byte per piece, not a Python set (a seed holding
    50,000 tasks of 40 pieces kept ~100 MiB of sets for this alone)."""

    __slots__ = ("_bits", "_count")

    def __init__(self, piece_count: int, numbers: Iterable[int] = ()) -> None:
        self._bits = bytearray(piece_count)
        self._count = 0
        for n in numbers:
            self.add(n)

    @classmethod
    def of_digests(cls, digests: array[int]) -> PieceSet:
        """The pieces that have a digest (not MISSING) in `digests`."""
        held = cls(0)
        missing = digests.count(MISSING)
        if missing:
            held._bits = bytearray(d != MISSING for d in digests)
        else:  # the usual case, a complete task: no look at each piece
            held._bits = bytearray(b"\x01") * len(digests)
        held._count = len(digests) - missing
        return held

    def add(self, number: int) -> None:
        if not self._bits[number]:
            self._bits[number] = 1
            self._count += 1

    def difference_update(self, numbers: Iterable[int]) -> None:
        for n in numbers:
            if self._bits[n]:
                self._bits[n] = 0
                self._count -= 1

    def __iter__(self) -> Iterator[int]:
        return (n for n, held in enumerate(self._bits) if held)

    def __contains__(self, number: object) -> bool:
        return isinstance(number, int) and 0 <= number < len(self._bits) and bool(self._bits[number])

    def __len__(self) -> int:
        return self._count


def short(task_id: str) -> str:
    """A task id as shown in messages."""
    return task_id[:12]


def check_meta(meta: TaskMeta) -> None:
    """StorageError unless the meta can name a file and describes a layout."""
    if not _TASK_ID.fullmatch(meta.task_id):
        raise StorageError(f"invalid task id {meta.task_id!r}: expected 3-200 characters of [A-Za-z0-9_-]")
    if meta.content_length < 0:
        raise StorageError(f"task {short(meta.task_id)}: negative content length {meta.content_length}")
    if meta.piece_length <= 0:
        raise StorageError(f"task {short(meta.task_id)}: piece length must be positive")


def is_task_id(name: str) -> bool:
    return _TASK_ID.fullmatch(name) is not None


def task_relpath(task_id: str) -> Path:
    return Path(TASKS_DIR) / task_id[:3] / task_id
