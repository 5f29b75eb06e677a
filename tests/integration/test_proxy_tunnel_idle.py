"""A running daemon honours `proxy.tunnel_idle_timeout_s`: a CONNECT tunnel in which bytes keep moving
stays open past that time; once no byte moves either way for that long, the daemon closes both ends
and says so in its log.

Real daemon (LocalCluster, one peer) with the timeout at 1 s; a raw socket as the client and a TCP echo
server on 127.0.0.1 as the CONNECT target (listed in `proxy.allowed_hosts`).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.cluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

IDLE_S = 1.0


class EchoTarget:
    """The CONNECT target: echoes what one connection sends; `ended` once that connection is closed."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
            except OSError:
                pass
        self.ended.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def target() -> Iterator[EchoTarget]:
    server = EchoTarget()
    yield server
    server.close()


def open_tunnel(proxy_port: int, target_port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    where = f"127.0.0.1:{target_port}"
    client.sendall(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        assert chunk, f"the proxy closed the connection instead of answering the CONNECT: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return client


def test_a_tunnel_closes_after_the_idle_timeout_and_not_while_bytes_move(
    target: EchoTarget, tmp_path: Path
) -> None:
    overrides = {"*": {"proxy": {"allowed_hosts": [f"https://127.0.0.1:{target.port}"],
                                 "tunnel_idle_timeout_s": IDLE_S}}}  # fmt: skip
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
        peer = cluster.peers[0]
        with open_tunnel(peer.ports["proxy"], target.port) as client:
            started = time.monotonic()
            for n in range(10):  # bytes each 0.25 s: 2.25 s in all, longer than the idle timeout
                if n:
                    time.sleep(0.25)  # the traffic's own pace (the scenario), not a wait for an event
                client.sendall(b"ping %d" % n)
                assert client.recv(64) == b"ping %d" % n
            last_byte = time.monotonic()
            assert last_byte - started > 2 * IDLE_S
            assert client.recv(64) == b""  # closed by the daemon (the socket's own timeout is 10 s)
            idle = time.monotonic() - last_byte
        assert target.ended.wait(10)  # the upstream end was closed too
        log = peer.log_path.read_text()
    assert 0.95 * IDLE_S <= idle < 5 * IDLE_S
    assert f"tunnel closed: no byte either way for {IDLE_S:g} s" in log
