"""Recovery of the storage dir at open (DESIGN.md §5 crash model); runs on the storage writer thread.

Rules:
- The clean-shutdown marker is read, then removed (and the removal made durable) before anything else,
  so a crash from here on is seen as unclean at the next open.
- Only records in SQLite count; they are durable by construction (a group commit fdatasyncs the task
  file before it records the file's pieces), so after an unclean stop nothing newer is trusted.
- The same consistency checks run after clean and unclean stops (they are cheap: one stat per task):
  a task record whose file is missing or has the wrong size goes with its piece records; piece records
  of missing tasks or out of range go; files under `tasks/` without a task record go.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from dfly.daemon.storage.db import MetadataDB
from dfly.daemon.storage.files import remove_empty_dir
from dfly.daemon.storage.model import TASKS_DIR, StoredTask, short, task_relpath

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    clean: bool  # the previous stop was clean (marker present)
    tasks: list[StoredTask]
    dropped_records: int = 0  # task records whose file was missing or short
    dropped_pieces: int = 0  # piece records of missing tasks or out of range
    removed_files: int = 0  # task files (or other entries under tasks/) without a record


def recover(root: Path, db: MetadataDB, *, clean: bool) -> RecoveryReport:
    """Make records and files agree; return the tasks that survived."""
    stored = db.load()
    report = RecoveryReport(clean=clean, tasks=[])
    bad_tasks: list[str] = []
    bad_pieces: list[tuple[str, int]] = []
    unfinished: list[str] = []
    for task_id, task in stored.items():
        path = root / task_relpath(task_id)
        try:
            st = os.lstat(path)
            ok = stat.S_ISREG(st.st_mode) and st.st_size == task.meta.content_length
        except OSError:
            ok = False
        if not ok:
            log.warning("task %s: file missing or wrong size, dropping its records", short(task_id))
            bad_tasks.append(task_id)
            continue
        count = task.meta.piece_count
        for number in [n for n in task.pieces if n < 0 or n >= count]:
            bad_pieces.append((task_id, number))
            del task.pieces[number]
        if task.finished and len(task.pieces) != count:
            log.warning(
                "task %s: finished but %d of %d pieces recorded", short(task_id), len(task.pieces), count
            )
            task.finished = False
            unfinished.append(task_id)
        report.tasks.append(task)
    orphans = db.orphan_piece_tasks()
    if bad_tasks or bad_pieces or orphans or unfinished:
        with db.transaction() as conn:
            MetadataDB.delete_tasks(conn, bad_tasks + list(orphans))
            MetadataDB.delete_pieces(conn, bad_pieces)
            MetadataDB.mark_finished(conn, unfinished, finished=False)
    report.dropped_records = len(bad_tasks)
    report.dropped_pieces = len(bad_pieces) + sum(len(stored[t].pieces) for t in bad_tasks)
    report.dropped_pieces += sum(orphans.values())
    # Files go after the records: a crash in between leaves files without records, removed next time.
    live = {t.meta.task_id for t in report.tasks}
    report.removed_files = _remove_strays(root / TASKS_DIR, live)
    if report.removed_files:
        log.warning("removed %d task files without a record", report.removed_files)
    return report


def _remove_strays(tasks_dir: Path, live: set[str]) -> int:
    removed = 0
    for prefix in list(tasks_dir.iterdir()):
        if not prefix.is_dir() or prefix.is_symlink():
            _remove(prefix)
            removed += 1
            continue
        for entry in list(prefix.iterdir()):
            if entry.name in live and entry.name[:3] == prefix.name and entry.is_file():
                continue
            _remove(entry)
            removed += 1
        remove_empty_dir(prefix)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
