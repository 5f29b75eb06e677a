"""The /metrics listener: the registry at /metrics (GET, name filter), 404 on every other path."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import pytest
from prometheus_client import CollectorRegistry, Counter

from dfly.common import metrics_http
from dfly.common.metrics_http import start_metrics_server


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("dfly_test_things", "things", registry=registry).inc(3)
    Counter("dfly_test_other", "other", registry=registry).inc()
    return registry


@contextlib.contextmanager
def serving(registry: CollectorRegistry, ip: str = "127.0.0.1") -> Iterator[WSGIServer]:
    server, thread = start_metrics_server(ip, 0, registry)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def port(registry: CollectorRegistry) -> Iterator[int]:
    with serving(registry) as server:
        yield int(server.server_port)


def fetch(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_path_answers_with_the_registry(port: int) -> None:
    status, content_type, body = fetch(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "dfly_test_things_total 3.0" in body
    assert "dfly_test_other_total 1.0" in body


def test_a_name_filter_selects_metrics(port: int) -> None:
    _, _, body = fetch(f"http://127.0.0.1:{port}/metrics?name[]=dfly_test_other_total")
    assert "dfly_test_other_total 1.0" in body
    assert "dfly_test_things" not in body


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/favicon.ico", "/healthy", "/v2/"])
def test_other_paths_are_not_found(port: int, path: str) -> None:
    status, content_type, body = fetch(f"http://127.0.0.1:{port}{path}")
    assert status == 404
    assert content_type == "text/plain; charset=utf-8"
    assert body == "not found: the metrics are at /metrics\n"


def test_an_ipv6_address_binds_as_ipv6(registry: CollectorRegistry) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    with serving(registry, "::1") as server:
        assert server.socket.family == socket.AF_INET6
        status, _, _ = fetch(f"http://[::1]:{server.server_port}/metrics")
        assert status == 200


def test_an_address_in_use_raises_oserror(registry: CollectorRegistry) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(OSError, match="in use"):
        start_metrics_server("127.0.0.1", taken.getsockname()[1], registry)


def test_an_idle_connection_is_closed_after_the_request_timeout(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each idle connection held a thread and a descriptor for as long as the client liked."""
    assert metrics_http._QuietHandler.timeout == metrics_http.REQUEST_TIMEOUT_S == 10.0
    monkeypatch.setattr(metrics_http._QuietHandler, "timeout", 0.5)  # the same, sooner
    with serving(registry) as server, socket.create_connection(("127.0.0.1", server.server_port), 10) as idle:
        assert idle.recv(1) == b""  # closed by the server (a timeout here would raise)


def test_a_connection_that_trickles_is_closed_after_the_request_timeout_too(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every so often kept a connection under the socket timeout for ever: 32 such clients
    refused every scrape."""
    assert metrics_http._QuietHandler.lifetime_s == metrics_http.REQUEST_TIMEOUT_S
    monkeypatch.setattr(metrics_http._QuietHandler, "lifetime_s", 0.5)  # the same, sooner
    with serving(registry) as server, socket.create_connection(("127.0.0.1", server.server_port), 10) as slow:
        slow.settimeout(0.2)
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 10:
            with contextlib.suppress(OSError):
                slow.sendall(b"G")  # one byte a tick, well within the 10 s socket timeout
            try:
                closed = slow.recv(1) == b""
            except TimeoutError:
                pass
        assert closed
        assert time.monotonic() - started < 5


def test_connections_over_the_cap_are_closed_at_once(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 3)
    with serving(registry) as server:
        port = int(server.server_port)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert extra.recv(1) == b""  # no thread for it: closed while the three idle ones hold theirs
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while (
            status := fetch_status(f"http://127.0.0.1:{port}/metrics")
        ) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)  # the idle ones' threads notice their close
        assert status == 200


def fetch_status(url: str) -> int:
    try:
        return fetch(url)[0]
    except OSError:  # closed over the cap while the idle connections' threads still end
        return 0
