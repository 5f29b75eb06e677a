"""Two schedulers: a task lives on one of them, and when that one dies its downloads move to the other.

Real processes: two schedulers, a seed and two peers on 127.0.0.1 (every daemon lists both schedulers),
a real origin paced so the seed's read takes seconds. peer-1 starts a download; the scheduler that owns
the task (rendezvous hash over the healthy ones) is stopped for good; the running downloads register
with the other one, and peer-2, asking later, is given them as parents. Both finish with the right bytes
and the origin sends one copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import Downloads, peers_on, stats, wait_until

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.daemon.scheduler_ring import owner
from dfly.daemon.task_request import TaskRequest
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 48 * MiB
ORIGIN_RATE = 8 * MiB
DFGET_TIMEOUT_S = 60.0


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www", rate_limit_bytes_per_s=ORIGIN_RATE) as server:
        yield server


def test_the_owning_scheduler_dies_and_its_task_moves_to_the_other(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=31)
    url = origin.url("/f.bin")
    with LocalCluster(tmp_path / "c", peers=2, schedulers=2) as cluster:
        addrs = cluster.scheduler_addrs
        task_id = TaskRequest(url=url).task_id
        owning_addr = owner(task_id, addrs)
        owning = cluster.schedulers[addrs.index(owning_addr)]
        other = next(m for m in cluster.schedulers if m is not owning)
        p1, p2 = cluster.member("peer-1"), cluster.member("peer-2")
        with Downloads() as downloads:
            downloads.start(p1, url, tmp_path / "one")
            wait_until("peer-1 has 4 MiB", lambda: stats(p1)["download_bytes"]["remote_seed"] >= 4 * MiB)
            other_addr = next(a for a in addrs if a != owning_addr)
            assert peers_on(owning_addr, task_id) >= 2  # the seed and peer-1: the task lives there
            assert peers_on(other_addr, task_id) == 0
            cluster.stop_member(owning.name)
            downloads.start(p2, url, tmp_path / "two")
            downloads.finish(DFGET_TIMEOUT_S)
        for out in ("one", "two"):
            assert file_digest(tmp_path / out).value == digest
        assert origin.bytes_sent <= 1.1 * FILE_BYTES, (
            f"origin sent {origin.bytes_sent / FILE_BYTES:.2f} copies"
        )
        for peer in (p1, p2):
            assert stats(peer)["download_bytes"]["back_to_source"] == 0, f"{peer.name} read the origin"
        assert "registered with the scheduler again" in cluster.seed.log_path.read_text()
        assert other.alive()
        assert peers_on(other_addr, task_id) >= 2  # it moved
