"""A daemon that stops answering without closing its connections (SIGSTOP here: a hung process, a lost
node, a cut link) has its scheduler streams ended by the scheduler's HTTP/2 pings (`grpc_keepalive_s`),
so its running download leaves the task instead of holding its place (and an origin reader's slot) for
TCP's ~2 hours. A scheduler that stops ends the daemons' keepalive streams itself, with UNAVAILABLE."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from clusterkit import dfget_popen, hung, peers_on, wait_until

from dfly.cluster import LocalCluster
from dfly.common.pieces import MiB
from dfly.daemon.task_request import TaskRequest
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration


def test_a_stopped_daemons_download_leaves_the_task(tmp_path: Path) -> None:
    scheduler = {"grpc_keepalive_s": 1, "scheduling": {"host_silence_s": 3600}}  # pings alone decide here
    with (
        Origin(tmp_path / "www", rate_limit_bytes_per_s=2 * MiB) as origin,
        LocalCluster(tmp_path / "c", peers=1, scheduler_overrides=scheduler) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        make_file(origin.root / "slow.bin", 64 * MiB, seed=71)
        url = origin.url("/slow.bin")
        task_id = TaskRequest(url=url).task_id
        peer = cluster.member("peer-1")
        download = dfget_popen(peer, url, tmp_path / "out")
        try:
            wait_until(
                "the seed and peer-1 registered", lambda: peers_on(cluster.scheduler_addr, task_id) == 2
            )
            with hung(peer):
                wait_until(
                    "peer-1's download left the task",
                    lambda: peers_on(cluster.scheduler_addr, task_id) == 1,
                    timeout_s=15,
                )
        finally:
            download.kill()
            download.wait()


def mentions(path: Path, text: str) -> bool:
    return text in path.read_text()


def test_a_stopping_scheduler_ends_keepalive_streams_without_a_traceback(tmp_path: Path) -> None:
    """Before, gRPC cancelled each daemon's keepalive handler at the end of the shutdown grace and logged
    a CancelledError traceback per daemon."""
    with LocalCluster(tmp_path / "c", peers=2) as cluster:
        assert cluster.stop_member("scheduler") == 0
        log = cluster.scheduler.log_path.read_text()
        for name in ("seed", "peer-1", "peer-2"):
            daemon_log = cluster.member(name).log_path
            wait_until(
                f"{name} saw its keepalive end", functools.partial(mentions, daemon_log, "keepalive broke")
            )
    assert "scheduler stopping" in log
    assert "Traceback" not in log, log
