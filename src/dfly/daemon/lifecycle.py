"""Start and stop steps of dfdaemon that are not wiring: the storage dir check, listener binding errors,
the open-files need, and the stop that runs every step whatever one raises.

Rules: a problem the operator fixes in the config is a ConfigError naming its key (exit 2), never a
traceback; a stop step that fails is logged and the later ones (the storage's clean close last) still run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dfly.common.errors import ConfigError
from dfly.daemon.config import DaemonConfig
from dfly.daemon.storage import storage as storage_module
from dfly.daemon.storage import writer
from dfly.daemon.transfer.server import MAX_CONNECTIONS as PIECE_CONNECTIONS

log = logging.getLogger(__name__)

DESCRIPTOR_SLACK = 64  # listeners, the metadata db, scheduler channels, logs, the origin reads


def check_storage_dir(path: Path) -> None:
    """`storage.dir` must be a directory or one that can be made (it is made here): a config error
    naming the key (exit 2), not a storage failure (exit 1)."""
    if "\0" in str(path):
        raise ConfigError("storage.dir: a path cannot contain a NUL byte")
    for candidate in (path, *path.parents):
        if not candidate.exists():
            continue
        if candidate.is_dir():
            break
        if candidate == path:
            raise ConfigError(f"storage.dir: {path} is not a directory")
        raise ConfigError(f"storage.dir: cannot create {path}: {candidate} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"storage.dir: cannot create {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def binding(key: str, where: str) -> Iterator[None]:
    """A listener that cannot bind (address in use or not on this host, no permission) is a config error
    naming its key, not a traceback."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # grpc's add_port raises RuntimeError("Failed to bind ...")
        # asyncio's OSError messages repeat the address; grpc's RuntimeError adds advice after a ';'
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).split(";")[0]
        raise ConfigError(f"{key}: cannot listen on {where}: {reason}") from None


def descriptors_needed(config: DaemonConfig) -> tuple[int, str]:
    """What `config` may hold open at once, and how that adds up (for the open-files limit check)."""
    proxy = config.proxy.max_connections if config.proxy.enable else 0
    tasks = writer.MAX_OPEN_FILES + storage_module.MAX_READ_FDS
    needed = proxy + PIECE_CONNECTIONS + tasks + DESCRIPTOR_SLACK
    return needed, (
        f"proxy.max_connections {proxy} + {PIECE_CONNECTIONS} piece connections + {tasks} task files "
        f"+ {DESCRIPTOR_SLACK} others"
    )


async def stop_in_order(*steps: tuple[str, Callable[[], object]]) -> None:
    """Run every step of a stop, in order, each awaited if it returns an awaitable: one that fails is
    logged and the rest still run (a failure in an early one skipped the storage's clean close)."""
    for what, step in steps:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("stopping %s failed", what)
