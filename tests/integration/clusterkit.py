"""Helpers shared by the integration tests that drive a LocalCluster: counters, probes, dfget."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest

from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc
from dfly.cluster import Member, query_stats
from dfly.common.digest import file_digest
from dfly.daemon.storage.model import task_relpath
from dfly.daemon.task_request import TaskRequest

PROBE_TIMEOUT_S = 20.0


def stats(member: Member) -> dict[str, Any]:
    """The daemon's counters (download_bytes by source, upload_bytes, tasks)."""
    assert member.socket is not None
    return query_stats(member.socket)


def from_parents(member: Member) -> int:
    """Bytes the daemon got from other daemons (the seed and peers), not from the origin."""
    got = stats(member)["download_bytes"]
    return int(got["remote_seed"]) + int(got["remote_peer"])


def has_2_mib_from_parents(member: Member) -> bool:
    return from_parents(member) >= 2 * 1024 * 1024


def task_file(data_dir: Path, url: str) -> Path:
    """Where a daemon with storage in `data_dir` keeps the task of a plain download of `url`."""
    return data_dir / task_relpath(TaskRequest(url=url).task_id)


def durable_record(member: Member, url: str) -> tuple[int, bool]:
    """The bytes of the task's pieces with a committed record in the member's metadata.db, and whether
    its finished mark is committed (read-only; (0, False) before the task's first commit)."""
    db_path = member.data_dir / "metadata.db"
    if not db_path.exists():
        return 0, False
    task_id = TaskRequest(url=url).task_id
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as db:
        row = db.execute("SELECT piece_length, finished FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        count = db.execute("SELECT COUNT(*) FROM pieces WHERE task_id = ?", (task_id,)).fetchone()[0]
    return (0, False) if row is None else (int(row[0]) * int(count), bool(row[1]))


def durable_bytes(member: Member, url: str) -> int:
    return durable_record(member, url)[0]


def finished_durably(member: Member, url: str) -> bool:
    """The task's finished mark is committed: a SIGKILL now cannot lose it (dfget is answered before
    the daemon's group commit, so a test that kills a daemon right after a download waits for this)."""
    return durable_record(member, url)[1]


def peers_on(addr: str, task_id: str) -> int:
    """How many peers of the task the scheduler at `addr` knows (0 when it never heard of the task, or
    forgot it with its last peer)."""
    with grpc.insecure_channel(addr) as channel:
        try:
            stat = scheduler_pb2_grpc.SchedulerStub(channel).StatTask(
                pb.StatTaskRequest(task_id=task_id), timeout=5
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return 0
            raise
    return int(stat.peer_count)


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Readiness probe: poll `check` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)


def dfget_cmd(member: Member, url: str, out: Path, *extra: str) -> list[str]:
    """The dfget command line that downloads `url` to `out` through `member`'s daemon."""
    assert member.socket is not None
    cmd = [sys.executable, "-m", "dfly.cli.dfget", "-e", str(member.socket), "--no-progress"]
    return [*cmd, url, "-O", str(out), *extra]


def dfget_popen(member: Member, url: str, out: Path) -> subprocess.Popen[str]:
    """dfget in the background, its stderr captured."""
    return subprocess.Popen(dfget_cmd(member, url, out), stderr=subprocess.PIPE, text=True)


def dfget_ok(member: Member, url: str, out: Path, timeout_s: float = 60.0) -> None:
    """dfget to the end; the test fails with its stderr unless it succeeded."""
    result = subprocess.run(dfget_cmd(member, url, out), capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def hung(member: Member) -> Iterator[None]:
    """The member stopped (SIGSTOP) inside the block, as a hung process or a link dropping packets: its
    sockets stay open and nothing answers. SIGCONT on the way out."""
    os.kill(member.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(member.pid, signal.SIGCONT)


def dfget_each_ok(member: Member, files: list[tuple[str, str]], out_dir: Path, timeout_s: float) -> None:
    """dfget each (url, sha256 digest) in turn through `member`; every one must succeed with its bytes."""
    for n, (url, digest) in enumerate(files):
        out = out_dir / f"each-{n}.out"
        dfget_ok(member, url, out, timeout_s=timeout_s)
        assert file_digest(out).value == digest, url


class Downloads:
    """Background dfgets of one test: `start` them, `finish` them (each must succeed); any still
    running when the block is left (a failed assertion) is killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def start(self, member: Member, url: str, out: Path) -> subprocess.Popen[str]:
        proc = dfget_popen(member, url, out)
        self.procs.append(proc)
        return proc

    def finish(self, timeout_s: float) -> None:
        for proc in self.procs:
            _, err = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, err


def ipv6_loopback() -> bool:
    """Whether this host can listen on ::1 (some containers have no IPv6)."""
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
