"""The storage GC's TTL with real daemons: an expired task is removed and the scheduler is told.

peer-1 (gc every 0.1 s, TTL 3 s) downloads a file; once it has not been used for the TTL its task file is
gone, the scheduler no longer lists peer-1's peer of that task, and peer-2 then downloads it with no byte
from peer-1; a scheduler that could not take that DeleteTask is told once it answers. (Eviction under
disk pressure: test_disk_full.py.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clusterkit import dfget_ok, hung, peers_on, stats, task_file, wait_until

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.daemon.task_request import TaskRequest
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration


@dataclass
class Downloaded:
    cluster: LocalCluster
    url: str
    digest: str
    task_id: str


@contextlib.contextmanager
def downloaded_by_peer_1(tmp_path: Path, peers: int, **peer_1: dict[str, Any]) -> Iterator[Downloaded]:
    """A cluster whose peer-1 collects garbage every 0.1 s with a 3 s TTL (plus `peer_1` config sections)
    and has just downloaded a 2 MiB file, which the seed and peer-1 then hold."""
    overrides = {"peer-1": {"gc": {"interval_s": 0.1, "task_ttl_s": 3.0}, **peer_1}}
    with (
        Origin(tmp_path / "www") as origin,
        LocalCluster(tmp_path / "c", peers=peers, daemon_overrides=overrides) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        digest = make_file(origin.root / "f.bin", 2 * MiB, seed=51)
        url = origin.url("/f.bin")
        dfget_ok(cluster.member("peer-1"), url, tmp_path / "one")
        task_id = TaskRequest(url=url).task_id
        assert peers_on(cluster.scheduler_addr, task_id) == 2  # the seed's and peer-1's (well within the TTL)
        yield Downloaded(cluster, url, digest, task_id)


def test_an_expired_task_is_removed_and_the_scheduler_stops_offering_it(tmp_path: Path) -> None:
    with downloaded_by_peer_1(tmp_path, peers=2) as done:
        p1, p2 = done.cluster.member("peer-1"), done.cluster.member("peer-2")
        assert p1.data_dir is not None
        wait_until("peer-1 deleted the task file", lambda: not task_file(p1.data_dir, done.url).exists())
        assert stats(p1)["gc"]["evicted_tasks"] == 1
        assert stats(p1)["tasks"] == 0
        addr = done.cluster.scheduler_addr
        wait_until("the scheduler forgot peer-1's copy", lambda: peers_on(addr, done.task_id) == 1)
        uploaded_before = stats(p1)["upload_bytes"]
        dfget_ok(p2, done.url, tmp_path / "two")
        assert file_digest(tmp_path / "two").value == done.digest
        assert stats(p1)["upload_bytes"] == uploaded_before  # nobody was sent to the evicted copy
        assert stats(p2)["gc"]["evicted_tasks"] == 0  # default TTL: 30 days


def test_a_scheduler_that_missed_the_deletion_is_told_once_it_answers(tmp_path: Path) -> None:
    """The scheduler hangs (SIGSTOP) while peer-1's GC evicts a task: the DeleteTask cannot be taken then,
    so peer-1 keeps it and sends it again when the scheduler answers, which then forgets peer-1's copy."""
    with downloaded_by_peer_1(tmp_path, peers=1, scheduler={"keepalive_interval_s": 0.5}) as done:
        p1 = done.cluster.member("peer-1")
        assert p1.data_dir is not None
        addr = done.cluster.scheduler_addr
        with hung(done.cluster.scheduler):
            wait_until("peer-1 deleted the task file", lambda: not task_file(p1.data_dir, done.url).exists())
            wait_until("peer-1 kept the DeleteTask", lambda: stats(p1)["scheduler_deletes_pending"] == 1)
        wait_until("the DeleteTask was taken", lambda: stats(p1)["scheduler_deletes_pending"] == 0)
        wait_until("the scheduler forgot peer-1's copy", lambda: peers_on(addr, done.task_id) == 1)
        assert "not told yet that task" in p1.log_path.read_text()
