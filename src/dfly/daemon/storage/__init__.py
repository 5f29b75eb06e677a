"""Daemon storage: one preallocated file per task, piece records in SQLite, one writer thread.

See `dfly.daemon.storage.storage` for the rules (DESIGN.md §5 "Storage and crash model").
"""

from dfly.daemon.storage.model import StoredTask, TaskMeta
from dfly.daemon.storage.recovery import RecoveryReport
from dfly.daemon.storage.storage import Storage

__all__ = ["RecoveryReport", "Storage", "StoredTask", "TaskMeta"]
