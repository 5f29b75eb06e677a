"""A benchmark host's page cache: what a new page costs, and a ballast that keeps the cache full.

On a VM with free page reporting (this project's machines), memory the guest has not touched recently
costs a host fault per page: writing a new file into free memory costs 1.3–2.5 s per GiB against ~0.2 s
when the kernel reclaims pages it already has. A production host runs with its page cache full, so
benchmarks that compare programs writing different numbers of copies (a dfly download keeps the task
file and writes the user's output; curl writes one copy) keep it full with `PageCacheBallast` before
every measured command, and report `page_cache_write_s_per_gib` so a reader can see the machine's part.
Rules: the ballast is a clean (fsynced) file the kernel reclaims from; it never takes more than the
machine's memory in all nor the last 4 GiB of its disk; the caller removes it (`remove`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB


def page_cache_write_s_per_gib(work: Path, mib: int = 512) -> tuple[float, float]:
    """Seconds per GiB to write a new file into the page cache: fresh memory, then just-freed memory.

    On a VM with free page reporting (this project's machines), memory the guest has not touched
    recently costs a host fault per page, which dominates any benchmark that writes new files; the
    two figures let a reader see how much of a run is this machine's memory rather than dfly.
    """
    block = os.urandom(MiB)
    path = work / "page-cache-probe.bin"
    figures = []
    for _ in range(2):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        started = time.monotonic()
        for i in range(mib):
            os.pwrite(fd, block, i * MiB)
        figures.append((time.monotonic() - started) * 1024 / mib)
        os.close(fd)
        path.unlink()
    return figures[0], figures[1]


def meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/meminfo")


def mem_free_bytes() -> int:
    return meminfo_bytes("MemFree")


def mem_total_bytes() -> int:
    return meminfo_bytes("MemTotal")


class PageCacheBallast:
    """Keeps the page cache full, as on any long-running host, before each measured command.

    With free memory, every new page-cache page on these VMs (free page reporting) is a host fault:
    ~1.3 s per GiB against ~0.2 s when the kernel reclaims pages it already has (see
    `page_cache_write_s_per_gib`). A cold dfget on one host writes three copies (seed cache, peer
    cache, output) and curl one, so free memory alone would decide the ratio. The ballast is a clean
    (fsynced) file the kernel reclaims from as the measured commands write, exactly as a full cache
    does in production; it is topped up so at most `slack` bytes stay free.
    """

    def __init__(self, path: Path, slack: int = 256 * MiB) -> None:
        self.path = path
        self.slack = slack
        self.written = 0
        self._block = os.urandom(MiB)

    def top_up(self) -> None:
        missing = mem_free_bytes() - self.slack
        # Bounded: never more than the machine's memory in all, never into the last 4 GiB of disk.
        missing = min(
            missing, mem_total_bytes() - self.written, shutil.disk_usage(self.path.parent).free - 4 * GiB
        )
        if missing < MiB:
            return
        with open(self.path, "ab") as f:
            for _ in range(missing // MiB):
                f.write(self._block)
            f.flush()
            os.fdatasync(f.fileno())
        self.written += missing // MiB * MiB

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
