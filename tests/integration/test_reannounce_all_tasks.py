"""After a scheduler restart every daemon announces every task it holds, and the new scheduler offers
each of them again: every cached task, not one per host (each was announced under the same peer id,
so each replaced the one before and a restarted scheduler knew one task per host)."""

from __future__ import annotations

from pathlib import Path

import pytest
from clusterkit import dfget_ok, peers_on, wait_until

from dfly.cluster import LocalCluster
from dfly.common.pieces import MiB
from dfly.daemon.task_request import TaskRequest
from dfly.devtools.origin import Origin

pytestmark = pytest.mark.integration


def test_a_restarted_scheduler_learns_every_cached_task(tmp_path: Path) -> None:
    with Origin() as origin, LocalCluster(tmp_path / "c", peers=1) as cluster:
        urls = [origin.add_bytes(f"f{n}.bin", bytes([n]) * MiB) for n in range(4)]
        peer = cluster.member("peer-1")
        for n, url in enumerate(urls):
            dfget_ok(peer, url, tmp_path / f"out-{n}")
        cluster.stop_member("scheduler")
        cluster.restart_member("scheduler")
        addr = cluster.scheduler_addr
        for url in urls:  # the seed's copy and peer-1's, of each task
            task_id = TaskRequest(url=url).task_id

            def both_known(task_id: str = task_id) -> bool:
                return peers_on(addr, task_id) == 2

            wait_until(f"both copies of {url} known again", both_known)
