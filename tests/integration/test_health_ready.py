"""The daemon's health port: `/healthy` answers while the daemon runs (liveness); `/ready` only while
it serves the swarm, i.e. some scheduler is connected (readiness): with every scheduler gone, downloads
read the origin, and a Kubernetes readiness probe should see it."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from clusterkit import wait_until

from dfly.cluster import LocalCluster, Member

pytestmark = pytest.mark.integration


def status(member: Member, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{member.ports['health']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_ready_follows_the_scheduler_and_healthy_does_not(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        peer = cluster.member("peer-1")
        assert status(peer, "/ready") == (200, "OK")
        cluster.kill_member("scheduler")
        wait_until("peer-1 not ready", lambda: status(peer, "/ready") == (503, "no scheduler connected"))
        assert status(peer, "/healthy") == (200, "OK")
        assert status(peer, "/nope")[0] == 404
