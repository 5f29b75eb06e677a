"""The SQLite side of the daemon's storage: task records and piece records in `metadata.db`.

Rules:
- Only the storage writer thread creates and uses a `MetadataDB` (the connection is opened with
  `check_same_thread=True`, so any use from another thread, e.g. the event loop, raises).
- WAL journal with `synchronous=FULL`: a committed transaction is durable (the WAL is fsynced).
- Every change is one explicit transaction; callers fdatasync task files *before* recording their pieces.
- SQLite errors are translated into `StorageError` with one line naming the database.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dfly.common.errors import StorageError, UsageError
from dfly.common.pieces import validate_layout
from dfly.daemon.storage.model import MISSING, StoredTask, TaskMeta, is_task_id

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    content_length INTEGER NOT NULL,
    piece_length INTEGER NOT NULL,
    response_headers TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pieces (
    task_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    digest INTEGER NOT NULL,
    PRIMARY KEY (task_id, number)
) WITHOUT ROWID;
"""

_NONE: array[int] = array("q")  # a task's digests before its piece records are read


@dataclass
class LoadedRecords:
    tasks: dict[str, StoredTask]  # every task record, with its piece records inside its layout
    outside: dict[str, list[int]]  # task id -> numbers of its piece records outside its layout
    orphans: dict[str, int]  # task ids with piece records but no task record -> how many records
    # task ids, as stored (text, or a BLOB after damage), of records that cannot be a task: a value of the
    # wrong type, no valid layout, or piece records that are not numbers
    invalid: list[object]


class MetadataDB:
    """Task and piece records; one instance per writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        except sqlite3.Error as exc:
            raise StorageError(f"metadata db {path}: {exc}") from exc
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"metadata db {path}: cannot enable WAL (journal mode {mode})")
            self._conn.execute("PRAGMA synchronous=FULL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StorageError(f"metadata db {path}: unknown schema version {version}")
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"metadata db {path}: {exc}") from exc
            raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back (and StorageError) on failure."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"metadata db {self.path}: {exc}") from exc
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as exc:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"metadata db {self.path}: {exc}") from exc
            raise

    def load(self) -> LoadedRecords:
        """Every task record with its piece records, in one pass over each table.

        The pieces come grouped by task (SQLite concatenates each task's numbers and digests, so Python
        touches one row per task, not per piece: 2 million piece rows took ~1 s more one by one)."""
        self._conn.text_factory = _text_or_bytes  # damaged text (not UTF-8) must not fail the whole load
        try:
            loaded = LoadedRecords({}, {}, {}, [])
            tasks = loaded.tasks
            rows = self._conn.execute(
                "SELECT task_id, url, content_length, piece_length, response_headers, finished FROM tasks"
            )
            for task_id, url, content_length, piece_length, headers, finished in rows:
                if not _valid_record(task_id, url, content_length, piece_length):
                    loaded.invalid.append(task_id)  # SQLite checks no types; bits can flip
                    continue
                meta = TaskMeta(task_id, url, content_length, piece_length, _headers(headers))
                tasks[task_id] = StoredTask(meta, _NONE, bool(finished))
            rows = self._conn.execute(
                "SELECT task_id, group_concat(number), group_concat(digest) FROM pieces GROUP BY task_id"
            )
            for task_id, numbers, digests in rows:
                task = tasks.get(task_id)
                if task is None:
                    loaded.orphans[task_id] = str(numbers).count(",") + 1
                    continue
                try:
                    task.digests, outside = _by_number(task.meta.piece_count, numbers, digests)
                except (TypeError, ValueError, OverflowError):  # a piece record that is not an int64
                    del tasks[task_id]  # (bytes: TypeError; other text: ValueError)
                    loaded.invalid.append(task_id)
                    continue
                if outside:
                    loaded.outside[task_id] = outside
            for task in tasks.values():
                if task.digests is _NONE:
                    task.digests = array("q", [MISSING]) * task.meta.piece_count
            return loaded
        except sqlite3.Error as exc:
            raise StorageError(f"metadata db {self.path}: {exc}") from exc
        finally:
            self._conn.text_factory = str
            _first_numbers.cache_clear()  # its strings can be megabytes (tasks of millions of pieces)

    @staticmethod
    def insert_tasks(conn: sqlite3.Connection, metas: Iterable[TaskMeta]) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO tasks (task_id, url, content_length, piece_length, response_headers, "
            "finished) VALUES (?, ?, ?, ?, ?, 0)",
            [
                (m.task_id, m.url, m.content_length, m.piece_length, json.dumps(m.response_headers))
                for m in metas
            ],
        )

    @staticmethod
    def set_headers(conn: sqlite3.Connection, metas: Iterable[TaskMeta]) -> None:
        conn.executemany(
            "UPDATE tasks SET response_headers = ? WHERE task_id = ?",
            [(json.dumps(m.response_headers), m.task_id) for m in metas],
        )

    @staticmethod
    def insert_pieces(conn: sqlite3.Connection, records: Iterable[tuple[str, int, int]]) -> None:
        conn.executemany("INSERT OR REPLACE INTO pieces (task_id, number, digest) VALUES (?, ?, ?)", records)

    @staticmethod
    def mark_finished(conn: sqlite3.Connection, task_ids: Iterable[str], *, finished: bool = True) -> None:
        conn.executemany(
            "UPDATE tasks SET finished = ? WHERE task_id = ?", [(int(finished), t) for t in task_ids]
        )

    def holds(self, task_id: str) -> bool:
        """Whether any record of the task is in the database."""
        query = (
            "SELECT 1 FROM tasks WHERE task_id = ? UNION ALL SELECT 1 FROM pieces WHERE task_id = ? LIMIT 1"
        )
        try:
            return self._conn.execute(query, (task_id, task_id)).fetchone() is not None
        except sqlite3.Error as exc:
            raise StorageError(f"metadata db {self.path}: {exc}") from exc

    def drop_leftovers(self, task_id: str) -> None:
        """Delete the records of the task if there are any (one transaction only then)."""
        if self.holds(task_id):
            with self.transaction() as conn:
                MetadataDB.delete_tasks(conn, [task_id])

    @staticmethod
    def delete_tasks(conn: sqlite3.Connection, task_ids: Iterable[object]) -> None:
        """Every record of these tasks. An id read back as bytes (a BLOB, or text that is not UTF-8
        after damage: recovery only) is matched by its bytes, whatever type SQLite holds it as; that
        comparison cannot use the primary key, so text ids keep the plain one."""
        ids = list(task_ids)
        texts = [(t,) for t in ids if not isinstance(t, bytes)]
        damaged = [(t,) for t in ids if isinstance(t, bytes)]
        for table in ("pieces", "tasks"):
            conn.executemany(f"DELETE FROM {table} WHERE task_id = ?", texts)
            conn.executemany(f"DELETE FROM {table} WHERE CAST(task_id AS BLOB) = ?", damaged)

    @staticmethod
    def delete_pieces(conn: sqlite3.Connection, records: Iterable[tuple[str, int]]) -> None:
        conn.executemany("DELETE FROM pieces WHERE task_id = ? AND number = ?", records)

    def close_reporting(self, *, checkpoint: bool) -> list[str]:
        """`close`, its error as a line in the list returned instead of raised."""
        try:
            self.close(checkpoint=checkpoint)
        except StorageError as exc:
            return [str(exc)]
        return []

    def close(self, *, checkpoint: bool) -> None:
        """Close the connection; with `checkpoint`, fold the WAL into the database first."""
        try:
            if checkpoint:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
        except sqlite3.Error as exc:
            raise StorageError(f"metadata db {self.path}: {exc}") from exc


def _valid_record(task_id: object, url: object, content_length: object, piece_length: object) -> bool:
    """Whether a task row's values can make a TaskMeta and a layout dfly could have made."""
    if not (isinstance(task_id, str) and is_task_id(task_id) and isinstance(url, str)):
        return False
    if type(content_length) is not int or type(piece_length) is not int:
        return False
    try:
        validate_layout(content_length, piece_length)
    except UsageError:
        return False
    return True


def _text_or_bytes(raw: bytes) -> str | bytes:
    """A TEXT value as str, or its bytes when damage made it something else than UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _headers(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):  # not text, or not JSON
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _by_number(count: int, numbers: str, digests: str) -> tuple[array[int], list[int]]:
    """One task's pieces from their concatenated numbers and digests (in the same row order): per piece
    its digest or MISSING, and the numbers outside 0..count-1."""
    if numbers == _first_numbers(count):  # every piece, in order: the usual case of a complete task
        return array("q", map(int, digests.split(","))), []
    by_number = array("q", [MISSING]) * count
    outside = []
    for number, digest in zip(map(int, numbers.split(",")), map(int, digests.split(",")), strict=True):
        if 0 <= number < count:
            by_number[number] = digest
        else:
            outside.append(number)
    return by_number, outside


@functools.lru_cache(maxsize=64)
def _first_numbers(count: int) -> str:
    return ",".join(map(str, range(count)))
