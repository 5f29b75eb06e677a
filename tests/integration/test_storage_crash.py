"""Storage crash test: a real process writes pieces and is SIGKILLed; the storage reopens consistent.

The child is this file run as a script (`python test_storage_crash.py child ROOT`): it finishes task
"done", writes half of task "half" and waits until that half is durable, prints READY, then keeps
writing the rest of "half" and rewriting task "busy" (commit interval 20 ms) until it is killed, printing
a line per round so the kill lands in the middle of writes and commits.

In "power" mode the child also simulates a power cut: its piece writes stay in its own memory until an
fdatasync of that file applies them (`_lose_unsynced_writes_on_kill`), so the SIGKILL loses every byte
that was not synced, as a power cut loses the page cache; a record for such a piece would point at
zeros.

After the kill the test reopens the storage in-process: the open is unclean, "done" is finished and
complete, "half" keeps at least the pieces that were durable before READY, and every recovered piece's
bytes on disk match its recorded CRC-32 and the bytes the child wrote.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from dfly.daemon.storage import Storage, StoredTask, TaskMeta

pytestmark = pytest.mark.integration

PIECE = 64 * 1024
PIECES = 32
TASKS = ("task-done", "task-half", "task-busy")


def meta_of(task_id: str) -> TaskMeta:
    return TaskMeta(task_id, f"https://example.com/{task_id}", PIECES * PIECE - 1000, PIECE, {"ETag": "x"})


def piece_bytes(task_id: str, number: int) -> bytes:
    _, length = meta_of(task_id).piece_span(number)
    return random.Random(f"{task_id}/{number}").randbytes(length)


async def _write(storage: Storage, task_id: str, number: int) -> None:
    data = piece_bytes(task_id, number)
    offset, _ = meta_of(task_id).piece_span(number)
    await storage.write_piece(task_id, number, offset, data, zlib.crc32(data))


def _lose_unsynced_writes_on_kill() -> None:
    """Piece writes are kept in memory (per file) until fdatasync of that file writes them out."""
    from dfly.daemon.storage import writer

    volatile: dict[int, list[tuple[int, bytes]]] = {}  # inode -> writes not yet synced
    real_fdatasync = os.fdatasync

    def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
        volatile.setdefault(os.fstat(fd).st_ino, []).append((offset, bytes(view)))

    def fdatasync(fd: Any) -> None:
        for offset, data in volatile.pop(os.fstat(fd).st_ino, []):
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        real_fdatasync(fd)

    writer.pwrite_all = pwrite_all  # type: ignore[attr-defined]
    os.fdatasync = fdatasync


async def _child(root: Path) -> None:
    storage = Storage(root, commit_interval_s=0.02)
    await storage.open()
    for task_id in TASKS:
        await storage.create_task(meta_of(task_id))
    for n in range(PIECES):
        await _write(storage, "task-done", n)
    await storage.finish_task("task-done")
    for n in range(PIECES // 2):
        await _write(storage, "task-half", n)
    while storage.stats()["pending_records"]:
        await storage.wait_for_commit()
    print("READY", flush=True)
    rounds = 0
    while True:
        for n in range(PIECES):
            if n >= PIECES // 2 and rounds == 0:
                await _write(storage, "task-half", n)
            await _write(storage, "task-busy", n)
        rounds += 1
        print(f"ROUND {rounds}", flush=True)


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the child process did not report in time")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the child process exited early (rc={proc.wait()})")
            return line.strip()


def _check_bytes(storage: Storage, task: StoredTask) -> None:
    fd = storage.read_fd(task.meta.task_id)
    for n, digest in task.pieces.items():
        offset, length = task.meta.piece_span(n)
        on_disk = os.pread(fd, length, offset)
        assert zlib.crc32(on_disk) == digest, f"{task.meta.task_id} piece {n}: bytes do not match the record"
        assert on_disk == piece_bytes(task.meta.task_id, n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("crash", ["sigkill", "power"])
def test_sigkill_leaves_durable_records_with_matching_bytes(tmp_path: Path, crash: str) -> None:
    root = tmp_path / "storage"
    proc = subprocess.Popen(
        [sys.executable, __file__, "child", str(root), crash],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert _read_line(proc, 30) == "READY"
        assert _read_line(proc, 30) == "ROUND 1"  # busy with writes and commits when killed
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    async def check() -> None:
        storage = Storage(root)
        tasks = {t.meta.task_id: t for t in await storage.open()}
        assert not storage.was_clean
        assert set(tasks) <= set(TASKS)
        done = tasks["task-done"]
        assert done.finished
        assert done.meta == meta_of("task-done")
        assert sorted(done.pieces) == list(range(PIECES))
        half = tasks["task-half"]
        assert not half.finished
        assert set(range(PIECES // 2)) <= set(half.pieces)
        for task in tasks.values():
            _check_bytes(storage, task)
        # The storage is usable: the half task can be completed and finished after the crash.
        for n in range(PIECES):
            if n not in half.pieces:
                await _write(storage, "task-half", n)
        await storage.finish_task("task-half")
        await storage.close()

    asyncio.run(check())


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    if sys.argv[3:4] == ["power"]:
        _lose_unsynced_writes_on_kill()
    asyncio.run(_child(Path(sys.argv[2])))
