"""A daemon told to stop (SIGTERM) while the proxy streams a slow download stops within seconds, and says
`stopping` on `/ready` meanwhile, so a balancer sends no new work. (aiohttp's default grace held such a
stop for two minutes: past systemd's 90 s and Kubernetes' 30 s, which then SIGKILL it mid-commit.)"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from clusterkit import dfget_cmd, wait_until
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


class StalledOrigin:
    """An origin that takes connections and never answers the object's GET: with `probe`, it answers
    the daemon's `Range: bytes=0-0` stat (206 of a 16 MiB object) first, so the read stalls on the body
    request instead of the stat. `stalled` is set once a request is left unanswered."""

    def __init__(self, probe: bool) -> None:
        self.probe = probe
        self.stalled = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> StalledOrigin:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self._listener.close()
        self._thread.join(5)
        for conn in self._held:
            conn.close()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                conn, _ = self._listener.accept()
                self._held.append(conn)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                if b"\r\n\r\n" not in request:
                    continue  # closed before a whole request
                if self.probe and b"range: bytes=0-0" in request.lower():
                    conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/16777216\r\n"
                                 b'ETag: "stalled"\r\nContent-Length: 1\r\n\r\nx')  # fmt: skip
                    continue  # the daemon closes it and opens another for the body
                self.stalled.set()


@pytest.mark.parametrize("probe", [False, True], ids=["stat-unanswered", "body-unanswered"])
def test_a_stop_does_not_wait_for_an_origin_that_never_answers(tmp_path: Path, probe: bool) -> None:
    """The seed's origin read is blocked on a connection the origin never answers (its timeouts are 30 s
    for the stat and 60 s per read): a SIGTERM still stops it within seconds, exit 0, no traceback (the
    blocked socket is shut down; it used to hold the exit for 29–59 s and then log the read's error)."""
    with StalledOrigin(probe) as origin, LocalCluster(tmp_path / "c", peers=1) as cluster:
        url = f"http://127.0.0.1:{origin.port}/stalled.bin"
        peer, seed = cluster.member("peer-1"), cluster.seed
        # the peer may not read the origin itself: the seed is the one blocked on it
        command = [*dfget_cmd(peer, url, tmp_path / "out"), "--disable-back-to-source"]
        dfget = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            assert origin.stalled.wait(30), "the seed never asked the origin"
            started = time.monotonic()
            os.kill(seed.pid, signal.SIGTERM)
            assert seed.process is not None
            assert seed.process.wait(timeout=STOP_BOUND_S + 5) == 0
            took = time.monotonic() - started
        finally:
            dfget.kill()
            dfget.wait()
    log = seed.log_path.read_text(errors="replace")
    assert took < 10.0, f"the stop took {took:.1f} s"
    assert "Traceback" not in log, log[-3000:]
    assert "never retrieved" not in log, log[-3000:]
