"""The storage GC with real daemons: TTL expiry tells the scheduler, and a full disk evicts the least
recently used tasks so a new download fits instead of failing.

- TTL: peer-1 (gc every 0.1 s, TTL 1 s) downloads a file; once it has not been used for the TTL its task
  file is gone, the scheduler no longer lists peer-1's peer of that task, and peer-2 then downloads it
  with no byte from peer-1.
- Pressure: peer-1's storage is a 6 MiB tmpfs (root only; skipped otherwise). Four 1 MiB files fill it
  to ~70 %; the first is used again. A fifth file of 2 MiB does not fit (without the GC its download
  fails with ENOSPC); before its file is created, the least recently used tasks (the second, third and
  fourth file) are evicted down to the 60 % mark: the download succeeds and the re-used first file stays.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from clusterkit import dfget_ok, stats, wait_until

from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc
from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.daemon.storage.model import task_relpath
from dfly.daemon.task_request import TaskRequest
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration


def peers_on(addr: str, task_id: str) -> int:
    """How many peers of the task the scheduler at `addr` knows."""
    request = pb.StatTaskRequest(task_id=task_id)
    with grpc.insecure_channel(addr) as channel:
        stat = scheduler_pb2_grpc.SchedulerStub(channel).StatTask(request, timeout=5)
    return int(stat.peer_count)


def task_file(data_dir: Path, url: str) -> Path:
    return data_dir / task_relpath(TaskRequest(url=url).task_id)


def test_an_expired_task_is_removed_and_the_scheduler_stops_offering_it(tmp_path: Path) -> None:
    overrides = {"peer-1": {"gc": {"interval_s": 0.1, "task_ttl_s": 1.0}}}
    with (
        Origin(tmp_path / "www") as origin,
        LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        digest = make_file(origin.root / "f.bin", 2 * MiB, seed=51)
        url = origin.url("/f.bin")
        p1, p2 = cluster.member("peer-1"), cluster.member("peer-2")
        assert p1.data_dir is not None
        dfget_ok(p1, url, tmp_path / "one")
        task_id = TaskRequest(url=url).task_id
        assert peers_on(cluster.scheduler_addr, task_id) == 2  # the seed's and peer-1's
        wait_until("peer-1 deleted the task file", lambda: not task_file(p1.data_dir, url).exists())
        assert stats(p1)["gc"]["evicted_tasks"] == 1
        assert stats(p1)["tasks"] == 0
        addr = cluster.scheduler_addr
        wait_until("the scheduler forgot peer-1's copy", lambda: peers_on(addr, task_id) == 1)
        uploaded_before = stats(p1)["upload_bytes"]
        dfget_ok(p2, url, tmp_path / "two")
        assert file_digest(tmp_path / "two").value == digest
        assert stats(p1)["upload_bytes"] == uploaded_before  # nobody was sent to the evicted copy
        assert stats(p2)["gc"]["evicted_tasks"] == 0  # default TTL: 30 days


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_evicts_the_least_recently_used_tasks_for_a_new_download(
    small_disk: Path, tmp_path: Path
) -> None:
    data = small_disk / "data"
    overrides = {"peer-1": {"storage": {"dir": str(data)}}}  # gc defaults: 80 % -> 60 % of the filesystem
    with (
        Origin(tmp_path / "www") as origin,
        LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        names = ["a", "b", "c", "d", "e"]
        sizes = {"a": 1 * MiB, "b": 1 * MiB, "c": 1 * MiB, "d": 1 * MiB, "e": 2 * MiB}
        digests = {n: make_file(origin.root / f"{n}.bin", sizes[n], seed=60 + i) for i, n in enumerate(names)}
        urls = {n: origin.url(f"/{n}.bin") for n in names}
        peer = cluster.peers[0]
        for name in ["a", "b", "c", "d"]:
            dfget_ok(peer, urls[name], tmp_path / f"out-{name}")
        local_before = stats(peer)["download_bytes"]["local"]
        dfget_ok(peer, urls["a"], tmp_path / "a-again")  # "a" is now the most recently used
        assert stats(peer)["download_bytes"]["local"] == local_before + 1 * MiB
        assert stats(peer)["gc"]["evicted_tasks"] == 0
        dfget_ok(peer, urls["e"], tmp_path / "out-e")  # does not fit: b, c and d go
        assert file_digest(tmp_path / "out-e").value == digests["e"]
        held = {n for n in names if task_file(data, urls[n]).exists()}
        assert held == {"a", "e"}
        assert stats(peer)["gc"]["evicted_tasks"] == 3
        usage = os.statvfs(small_disk)
        assert usage.f_bavail / usage.f_blocks > 0.2  # below the high mark again
        dfget_ok(peer, urls["b"], tmp_path / "b-again")  # an evicted task downloads again, correct
        assert file_digest(tmp_path / "b-again").value == digests["b"]
        assert peer.alive()
