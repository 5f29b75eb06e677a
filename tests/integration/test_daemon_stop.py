"""A daemon told to stop (SIGTERM) while the proxy streams a slow download stops within seconds, and says
`stopping` on `/ready` meanwhile, so a balancer sends no new work. (aiohttp's default grace held such a
stop for two minutes: past systemd's 90 s and Kubernetes' 30 s, which then SIGKILL it mid-commit.)"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from clusterkit import wait_until
from test_health_ready import status

from dfly.cluster import LocalCluster
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin

pytestmark = pytest.mark.integration

STOP_BOUND_S = 15.0  # the proxy's grace is ~2 × 2 s; the rest of the stop takes well under a second


def test_a_stop_does_not_wait_for_a_slow_proxy_download(tmp_path: Path) -> None:
    with Origin(rate_limit_bytes_per_s=2 * MiB) as origin:
        overrides = {"peer-1": {"proxy": {"allowed_hosts": [origin.base_url]}}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
            stop_while_streaming(cluster, origin)


def stop_while_streaming(cluster: LocalCluster, origin: Origin) -> None:
    url = origin.add_bytes("slow.bin", os.urandom(64 * MiB))  # ~32 s at the origin's rate
    peer = cluster.member("peer-1")
    with socket.create_connection(("127.0.0.1", peer.ports["proxy"]), timeout=30) as client:
        head = f"GET {url} HTTP/1.1\r\nHost: {origin.host}:{origin.port}\r\nX-Dragonfly-Use-P2P: true\r\n"
        client.sendall(f"{head}\r\n".encode())
        assert client.recv(65536).startswith(b"HTTP/1.1 200")  # the body is streaming
        started = time.monotonic()
        os.kill(peer.pid, signal.SIGTERM)
        wait_until("/ready says stopping", lambda: status(peer, "/ready") == (503, "stopping"), 5.0)
        assert peer.process is not None
        assert peer.process.wait(timeout=STOP_BOUND_S + 5) == 0
    assert time.monotonic() - started < STOP_BOUND_S
