"""Recovery of the storage dir at open (DESIGN.md §5 crash model); runs on the storage writer thread.

Rules:
- The clean-shutdown marker is read, then removed (and the removal made durable) before anything else,
  so a crash from here on is seen as unclean at the next open.
- Only records in SQLite count; they are durable by construction (a group commit fdatasyncs the task
  file before it records the file's pieces), so after an unclean stop nothing newer is trusted.
- The same consistency checks run after clean and unclean stops (they are cheap: one stat per task):
  a task record whose file is missing or has the wrong size goes with its piece records, and so does a
  damaged one (values of the wrong type, no valid layout, a piece record that is not an int64: SQLite
  checks neither types nor checksums; a BLOB task id is deleted as the BLOB it is); piece records of
  missing tasks or out of range go; files under `tasks/` without a task record go.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dfly.daemon.storage.db import MetadataDB
from dfly.daemon.storage.files import remove_empty_dir
from dfly.daemon.storage.model import TASKS_DIR, StoredTask, short

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    clean: bool  # the previous stop was clean (marker present)
    tasks: list[StoredTask]
    dropped_records: int = 0  # task records whose file was missing or short, or that were damaged
    dropped_pieces: int = 0  # piece records of missing tasks or out of range
    removed_files: int = 0  # task files (or other entries under tasks/) without a record


def recover(root: Path, db: MetadataDB, *, clean: bool) -> RecoveryReport:
    """Make records and files agree; return the tasks that survived."""
    loaded = db.load()
    stored = loaded.tasks
    files, strays = _scan(root / TASKS_DIR, stored)
    report = RecoveryReport(clean=clean, tasks=[])
    bad_tasks: list[str] = []
    bad_pieces: list[tuple[str, int]] = []
    unfinished: list[str] = []
    for task_id, task in stored.items():
        st = files.get(task_id)
        if st is None or st.st_size != task.meta.content_length:
            log.warning("task %s: file missing or wrong size, dropping its records", short(task_id))
            bad_tasks.append(task_id)
            if st is not None:
                strays.append(_path(root, task_id))
            continue
        task.mtime = st.st_mtime
        bad_pieces.extend((task_id, n) for n in loaded.outside.get(task_id, ()))
        count = task.meta.piece_count
        if task.finished and (held := task.held) != count:
            log.warning("task %s: finished but %d of %d pieces recorded", short(task_id), held, count)
            task.finished = False
            unfinished.append(task_id)
        report.tasks.append(task)
    orphans = loaded.orphans
    for damaged_id in loaded.invalid:  # its file, if any, is a stray now: removed below
        log.warning(
            "task %.40r: its records are damaged (values no task can have), dropping them", damaged_id
        )
    if bad_tasks or bad_pieces or orphans or unfinished or loaded.invalid:
        with db.transaction() as conn:
            MetadataDB.delete_tasks(conn, [*bad_tasks, *orphans, *loaded.invalid])
            MetadataDB.delete_pieces(conn, bad_pieces)
            MetadataDB.mark_finished(conn, unfinished, finished=False)
    report.dropped_records = len(bad_tasks) + len(loaded.invalid)
    report.dropped_pieces = len(bad_pieces) + sum(orphans.values())
    report.dropped_pieces += sum(stored[t].held + len(loaded.outside.get(t, ())) for t in bad_tasks)
    # Files go after the records: a crash in between leaves files without records, removed next time.
    for path in strays:
        _remove(path)
    for prefix in {os.path.dirname(path) for path in strays}:
        if os.path.dirname(prefix) == str(root / TASKS_DIR):
            remove_empty_dir(Path(prefix))
    report.removed_files = len(strays)
    if report.removed_files:
        log.warning("removed %d task files without a record", report.removed_files)
    return report


def _scan(tasks_dir: Path, stored: dict[str, StoredTask]) -> tuple[dict[str, os.stat_result], list[str]]:
    """One pass over `tasks/`: the lstat of each regular file at the path of a task record, and every
    other entry (strays: not a prefix dir, or in one but not a task file with a record). Empty prefix
    dirs are removed. One lstat per task file (the entry types come with the directory listing)."""
    files: dict[str, os.stat_result] = {}
    strays: list[str] = []
    with os.scandir(tasks_dir) as prefixes:
        for prefix in prefixes:
            if prefix.is_symlink() or not prefix.is_dir():
                strays.append(prefix.path)
                continue
            empty = True
            with os.scandir(prefix.path) as entries:
                for entry in entries:
                    empty = False
                    name = entry.name
                    if name in stored and name[:3] == prefix.name and entry.is_file(follow_symlinks=False):
                        files[name] = entry.stat(follow_symlinks=False)
                    else:
                        strays.append(entry.path)
            if empty:
                remove_empty_dir(Path(prefix.path))
    return files, strays


def _path(root: Path, task_id: str) -> str:
    return os.path.join(root, TASKS_DIR, task_id[:3], task_id)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
