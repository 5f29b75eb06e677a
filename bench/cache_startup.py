"""Benchmark: start-up of a daemon holding a large cache (`--tasks` complete tasks of `--pieces` pieces).

Builds a real storage dir through the project's storage API: task files and task records by
`Storage.create_task` (the writer thread's group commits), piece records and the finished flags by the
group commit's own `MetadataDB` helpers in batches (2 million `write_piece` round trips would take
minutes; recovery reads records, never piece bytes, and each digest is the CRC-32 of the file's zeros).
Then, each in a fresh process:
- `floor`: read every row of `metadata.db` with plain sqlite3 (nothing can load faster);
- `load`: what `dfdaemon` runs at start before it listens (daemon/app.py `run`): `load_cache`
  (`Storage.open`, i.e. crash recovery, then `TaskManager.load` and `gc.freeze`) and
  `StorageGC.loaded_from_mtimes`; `open_s` is the `Storage.open` part; its peak RSS is the process's
  (imports included), `rss_before_mib` is before `Storage.open`;
- `dfdaemon` (unless `--no-daemon`): a real daemon process, spawn to its "ready" log line (written
  after its ready file, once the scheduler took its announce of every held task), against a scheduler
  of a `LocalCluster`, once with an empty storage dir and once with the cache; VmHWM at ready.

Prints ONE JSON line on stdout (progress on stderr). `--dir DIR` builds the cache there, or reuses it
when it is already built, and keeps it (alternating runs of two code versions); without it a temp dir is
used and removed. `--profile FILE` writes the cProfile stats of one more `load` run (the storage writer
thread's, where recovery runs, to FILE.writer). Every child has a timeout; exit 1 with the reason on
stderr when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import random
import re
import resource
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import yaml

from dfly.cluster import LocalCluster, daemon_config
from dfly.daemon.storage import Storage, StoredTask, TaskMeta
from dfly.daemon.storage.db import MetadataDB
from dfly.daemon.storage.model import DB_NAME

KiB = 1024
BUILD_BATCH = 2000
CHILD_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 300.0
READY_LINE = re.compile(r" dfdaemon \S+ ready \(")
BUILT_MARK = "bench-built.json"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[cache_startup] {msg}", file=sys.stderr, flush=True)


def rss_mib(field: str = "VmRSS", pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} in /proc/{pid}/status")


# -- building the cache ----------------------------------------------------------------------------


def task_meta(i: int, pieces: int, piece_length: int) -> TaskMeta:
    url = f"http://origin.invalid/bench/blob-{i}"
    headers = {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{i:016x}"',
        "Last-Modified": "Sat, 28 Nov 2026 10:00:00 GMT",
    }
    task_id = hashlib.sha256(url.encode()).hexdigest()
    return TaskMeta(task_id, url, pieces * piece_length, piece_length, headers)


async def _create_tasks(root: Path, metas: list[TaskMeta]) -> None:
    storage = Storage(root)
    await storage.open()
    try:
        for start in range(0, len(metas), BUILD_BATCH):
            await asyncio.gather(*(storage.create_task(m) for m in metas[start : start + BUILD_BATCH]))
    finally:
        await storage.close()  # the final group commit records every task; the clean marker is written


def build(root: Path, tasks: int, pieces: int, piece_length: int) -> dict[str, Any]:
    built = root / BUILT_MARK
    want = {"tasks": tasks, "pieces": pieces, "piece_length": piece_length}
    if built.exists():
        if json.loads(built.read_text()) != want:
            raise BenchError(f"{root} holds another cache: {built.read_text().strip()}")
        log(f"reusing the cache in {root}")
        return {"build_s": None}
    if root.exists() and any(root.iterdir()):
        raise BenchError(f"{root} is not empty and holds no built cache")
    start = time.perf_counter()
    metas = [task_meta(i, pieces, piece_length) for i in range(tasks)]
    asyncio.run(_create_tasks(root, metas))
    log(f"{tasks} task files and records in {time.perf_counter() - start:.1f} s")
    digest = zlib.crc32(bytes(piece_length))  # preallocated files read as zeros
    db = MetadataDB(root / DB_NAME)
    try:
        for first in range(0, tasks, BUILD_BATCH):
            batch = metas[first : first + BUILD_BATCH]
            with db.transaction() as conn:
                MetadataDB.insert_pieces(conn, [(m.task_id, n, digest) for m in batch for n in range(pieces)])
                MetadataDB.mark_finished(conn, [m.task_id for m in batch])
    finally:
        db.close(checkpoint=True)
    built.write_text(json.dumps(want))
    elapsed = time.perf_counter() - start
    log(f"built {tasks} tasks x {pieces} pieces in {elapsed:.1f} s")
    return {"build_s": round(elapsed, 1)}


# -- the children ----------------------------------------------------------------------------------


def measure_floor(root: Path) -> dict[str, Any]:
    start = time.perf_counter()
    conn = sqlite3.connect(root / DB_NAME)
    tasks = sum(1 for _ in conn.execute("SELECT * FROM tasks"))
    pieces = sum(1 for _ in conn.execute("SELECT * FROM pieces"))
    conn.close()
    return {"floor_s": time.perf_counter() - start, "rows": tasks + pieces}


async def _load(root: Path) -> dict[str, Any]:
    # Imported here as the daemon imports them, not counted in the times.
    from dfly.daemon.app import load_cache
    from dfly.daemon.config import DaemonConfig
    from dfly.daemon.context import Counters, DaemonContext
    from dfly.daemon.gc import StorageGC
    from dfly.daemon.tasks import TaskManager
    from dfly.daemon.transfer.buffers import BufferPool

    config = DaemonConfig.model_validate({"storage": {"dir": str(root)}})
    storage = Storage(config.storage.dir, commit_interval_s=config.storage.commit_interval_s)
    counters = Counters()
    ctx = DaemonContext(
        config=config,
        host_id="127.0.0.1-bench",
        hostname="bench",
        ip="127.0.0.1",
        seed=False,
        storage=storage,
        scheduler=None,
        pool=BufferPool(config.download.buffer_bytes),
        counters=counters,
        rng=random.Random(),
    )
    manager = TaskManager(ctx)
    opened = storage.open
    open_s = 0.0

    async def timed_open() -> list[StoredTask]:
        nonlocal open_s
        start = time.perf_counter()
        try:
            return await opened()
        finally:
            open_s = time.perf_counter() - start

    storage.open = timed_open  # type: ignore[method-assign]
    rss_before = rss_mib()
    t0 = time.perf_counter()
    await load_cache(storage, manager)  # as daemon/app.py `run` does, then the GC's start
    StorageGC(config.gc, storage, manager, counters).loaded_from_mtimes()
    load_s = time.perf_counter() - t0
    held = sum(1 for _ in manager.finished_tasks())
    rss_after = rss_mib()
    await storage.close()
    return {
        "open_s": open_s,
        "tasks_load_s": load_s - open_s,
        "load_s": load_s,
        "held_complete": held,
        "recovery": {k: v for k, v in vars(storage.recovery).items() if k != "tasks"},
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_load(root: Path, profile: Path | None) -> dict[str, Any]:
    if profile is None:
        return asyncio.run(_load(root))
    # Recovery runs on the storage writer thread: its own profiler, dumped next to the loop's.
    from dfly.daemon.storage import writer

    opened = writer.WriterThread._open

    def profiled_open(self: writer.WriterThread) -> Any:
        thread_profiler = cProfile.Profile()
        try:
            return thread_profiler.runcall(opened, self)
        finally:
            thread_profiler.dump_stats(f"{profile}.writer")

    writer.WriterThread._open = profiled_open  # type: ignore[method-assign]
    profiler = cProfile.Profile()
    result = profiler.runcall(asyncio.run, _load(root))
    profiler.dump_stats(profile)
    return result


def run_child(mode: str, root: Path, profile: Path | None = None) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--measure", mode, "--dir", str(root)]
    if profile is not None:
        argv += ["--profile", str(profile)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{mode} child took more than {CHILD_TIMEOUT_S:g} s") from None
    if out.returncode != 0:
        raise BenchError(f"{mode} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


# -- a real dfdaemon -------------------------------------------------------------------------------


def daemon_start(cluster: LocalCluster, name: str, data_dir: Path) -> dict[str, Any]:
    """Spawn dfdaemon on `data_dir`; seconds from spawn to its ready line, and its VmHWM then."""
    cfg = daemon_config(name, cluster.base_dir, cluster.scheduler_addr, log_level="info")
    cfg["storage"]["dir"] = str(data_dir)
    (cluster.base_dir / name).mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = cluster.base_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ready_file = cluster.base_dir / f"{name}.ready.json"
    argv = [*cluster.daemon_cmd, "--config", str(config_path), "--ready-file", str(ready_file)]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            deadline = start + READY_TIMEOUT_S
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise BenchError(f"{name}: not ready within {READY_TIMEOUT_S:g} s")
                if not sel.select(remaining):
                    continue
                line = proc.stderr.readline().decode("utf-8", "replace")
                if not line:
                    tail = "".join(lines[-20:])
                    raise BenchError(f"{name} exited with {proc.wait()} before it was ready:\n{tail}")
                lines.append(line)
                if READY_LINE.search(line):
                    break
        ready_s = time.perf_counter() - start
        if not ready_file.exists():
            raise BenchError(f"{name} logged ready without its ready file")
        hwm = rss_mib("VmHWM", str(proc.pid))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise BenchError(f"{name} stopped with {proc.returncode}:\n{err.decode()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"ready_s": ready_s, "peak_rss_mib": hwm}


def measure_daemons(base: Path, root: Path) -> dict[str, Any]:
    with LocalCluster(base, peers=0, ready_timeout_s=60.0) as cluster:
        empty = daemon_start(cluster, "bench-empty", base / "empty-data")
        log(f"dfdaemon, empty cache: ready in {empty['ready_s']:.2f} s")
        full = daemon_start(cluster, "bench-full", root)
        log(f"dfdaemon, with the cache: ready in {full['ready_s']:.2f} s")
    return {
        "dfdaemon_empty_ready_s": round(empty["ready_s"], 3),
        "dfdaemon_ready_s": round(full["ready_s"], 3),
        "dfdaemon_cache_cost_s": round(full["ready_s"] - empty["ready_s"], 3),
        "dfdaemon_empty_peak_rss_mib": round(empty["peak_rss_mib"], 1),
        "dfdaemon_peak_rss_mib": round(full["peak_rss_mib"], 1),
    }


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--pieces", type=int, default=40, help="pieces per task")
    parser.add_argument("--piece-kib", type=int, default=4, help="piece length in KiB (small files)")
    parser.add_argument("--dir", type=Path, help="build (or reuse) the cache here and keep it")
    parser.add_argument("--no-daemon", action="store_true", help="skip the real dfdaemon starts")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of one more load run here")
    parser.add_argument("--measure", choices=["floor", "load"], help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.pieces < 1 or args.piece_kib < 1:
        parser.error("--tasks, --pieces and --piece-kib must be positive")
    return args


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = args.dir if args.dir is not None else work / "cache"
    result: dict[str, Any] = {"tasks": args.tasks, "pieces": args.pieces, "piece_kib": args.piece_kib}
    result.update(build(root, args.tasks, args.pieces, args.piece_kib * KiB))
    floor = run_child("floor", root)
    load = run_child("load", root)
    log(f"floor {floor['floor_s']:.2f} s, load {load['load_s']:.2f} s")
    if load["held_complete"] != args.tasks or load["recovery"]["dropped_records"]:
        raise BenchError(f"the load did not find the cache whole: {load}")
    result.update(
        floor_s=round(floor["floor_s"], 3),
        db_rows=floor["rows"],
        load_s=round(load["load_s"], 3),
        open_s=round(load["open_s"], 3),
        tasks_load_s=round(load["tasks_load_s"], 3),
        load_over_floor=round(load["load_s"] / floor["floor_s"], 2),
        load_rss_before_mib=round(load["rss_before_mib"], 1),
        load_rss_after_mib=round(load["rss_after_mib"], 1),
        load_peak_rss_mib=round(load["peak_rss_mib"], 1),
    )
    if args.profile is not None:
        run_child("load", root, args.profile)
        log(f"profile of a load written to {args.profile}")
    if not args.no_daemon:
        result.update(measure_daemons(work / "cluster", root))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:
        assert args.dir is not None
        out = measure_floor(args.dir) if args.measure == "floor" else measure_load(args.dir, args.profile)
        print(json.dumps(out))
        return 0
    work = Path(tempfile.mkdtemp(prefix="dfly-cache-startup-"))
    try:
        print(json.dumps(bench(args, work)))
        return 0
    except BenchError as exc:
        print(f"cache_startup: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
