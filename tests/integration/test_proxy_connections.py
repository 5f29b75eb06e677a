"""The proxy port's own HTTP hygiene: connections that never complete a request are closed, and requests
aiohttp cannot parse are one INFO line in the log, not an ERROR with a traceback per request.

Real daemon (LocalCluster, one peer) with `proxy.idle_timeout_s` at 1 s; raw sockets as clients.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from dfly.cluster import LocalCluster

pytestmark = pytest.mark.integration

IDLE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    overrides = {"*": {"proxy": {"idle_timeout_s": IDLE_TIMEOUT_S}}}
    with LocalCluster(tmp_path_factory.mktemp("c"), peers=1, daemon_overrides=overrides) as running:
        yield running


def closed_after(port: int, sent: bytes, limit_s: float = 10.0) -> tuple[float, bytes]:
    """(seconds until the daemon closed the connection, what it sent before) for a client sending `sent`."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return time.monotonic() - started, received


@pytest.mark.parametrize(
    "sent",
    [
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
        b"G",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",  # a complete request, then an idle keep-alive
    ],
)
def test_a_connection_without_a_request_in_progress_is_closed(cluster: LocalCluster, sent: bytes) -> None:
    took, received = closed_after(cluster.peers[0].ports["proxy"], sent)
    assert IDLE_TIMEOUT_S * 0.9 <= took < IDLE_TIMEOUT_S + 5  # before the fix: an hour
    assert received == b"" or received.startswith(b"HTTP/1.1 200")


def test_unparsable_requests_are_one_info_line_each(cluster: LocalCluster) -> None:
    peer = cluster.peers[0]
    bad = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    _, received = closed_after(peer.ports["proxy"], bad)
    assert received.split(b" ", 2)[1] == b"400"
    log = peer.log_path.read_text(errors="replace")
    [line] = [line for line in log.splitlines() if "Error handling request" in line]
    assert " INFO " in line
    assert "Traceback" not in log
