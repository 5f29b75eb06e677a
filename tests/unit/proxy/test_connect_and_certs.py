"""CONNECT head parsing, the interception CA (generated once and kept, or configured and checked) and the
host certificates it signs: a TLS handshake in-process proves a client trusting the CA accepts them."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import stat
import struct
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from dfly.common.errors import ConfigError
from dfly.daemon.config import ProxySection
from dfly.daemon.proxy.certs import HostCertificates, load_or_create_ca
from dfly.daemon.proxy.connect import (
    HEAD_LIMIT,
    _starts_with_connect,
    accept_loop,
    open_upstream,
    parse_connect,
    read_head,
    reply,
    tunnel,
)
from dfly.daemon.proxy.forward import never_upstream
from dfly.daemon.proxy.registry import BadRequest, Forbidden
from dfly.devtools.pki import make_pki


def test_parse_connect_reads_target_and_headers() -> None:
    host, port, headers = parse_connect(b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic x")
    assert (host, port, headers) == ("example.com", 443, {"proxy-authorization": "Basic x"})
    assert parse_connect(b"CONNECT [::1]:8443 HTTP/1.0")[:2] == ("::1", 8443)
    assert parse_connect(b"CONNECT 10.0.0.1:443 HTTP/1.1")[:2] == ("10.0.0.1", 443)
    assert parse_connect(b"CONNECT my_host.internal-1:443 HTTP/1.1")[:2] == ("my_host.internal-1", 443)


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT example.com HTTP/1.1",
        b"CONNECT example.com:0 HTTP/1.1",
        b"CONNECT example.com:99999 HTTP/1.1",
        b"CONNECT :443 HTTP/1.1",
        b"CONNECT example.com:443 SPDY/3",
        b"GET example.com:443 HTTP/1.1",
        b"CONNECT example.com:443",
        b"CONNECT example.com:443 HTTP/1.1\r\nno colon here",
        b"CONNECT [[]:443 HTTP/1.1",
        b"CONNECT [::1:443 HTTP/1.1",
        b"CONNECT ]:443 HTTP/1.1",
        b"CONNECT [127.0.0.1]:443 HTTP/1.1",
        b"CONNECT ::1:443 HTTP/1.1",
        b"CONNECT a@example.com:443 HTTP/1.1",  # checked as example.com, dialled as a@example.com
        b"CONNECT exa\tmple.com:443 HTTP/1.1",
        b"CONNECT example.com:\xd9\xa3 HTTP/1.1",
    ],
)
def test_parse_connect_refuses_malformed_heads(head: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_connect(head)


def test_read_head_stops_at_the_limit() -> None:
    async def head_of(data: bytes) -> tuple[bytes, bytes]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            theirs.sendall(data)
            return await read_head(ours)

    async def run() -> None:
        start = b"CONNECT a:443 HTTP/1.1\r\nX: "
        with pytest.raises(BadRequest, match="longer than"):
            await head_of(start + b"y" * 20000)  # no end in sight
        exact = start + b"y" * (HEAD_LIMIT - len(start) - 4)
        assert await head_of(exact + b"\r\n\r\n") == (exact, b"")
        with pytest.raises(BadRequest, match="longer than"):
            await head_of(exact + b"y\r\n\r\n")  # one byte over, though the end arrived
        assert await head_of(b"CONNECT a:443 HTTP/1.1\r\n\r\nearly") == (b"CONNECT a:443 HTTP/1.1", b"early")

    asyncio.run(run())


def test_generated_ca_is_kept_private_and_reused(tmp_path: Path) -> None:
    cert, _, path = load_or_create_ca("", "", tmp_path / "data")
    assert path == tmp_path / "data" / "proxy-ca.crt"
    assert stat.S_IMODE((tmp_path / "data" / "proxy-ca.key").stat().st_mode) == 0o600
    again, _, _ = load_or_create_ca("", "", tmp_path / "data")
    assert again == cert  # a restart keeps the CA that clients were told to trust


def test_configured_ca_must_be_a_ca_with_its_own_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["leaf", "other"])
    with pytest.raises(ConfigError, match="not a CA"):
        load_or_create_ca(str(pki["leaf"]), str(pki["leaf.key"]), tmp_path)
    with pytest.raises(ConfigError, match="not the key"):
        load_or_create_ca(str(pki["ca"]), str(pki["other.key"]), tmp_path)
    with pytest.raises(ConfigError, match="cannot load"):
        load_or_create_ca(str(tmp_path / "missing.pem"), str(pki["other.key"]), tmp_path)


def test_config_wants_cert_and_key_together_and_valid_host_patterns() -> None:
    with pytest.raises(ValidationError, match="both cert and key"):
        ProxySection.model_validate({"hijack_https": {"cert": "/etc/ca.pem"}})
    with pytest.raises(ValidationError, match=r"hijack_https\.hosts: invalid proxy rule"):
        ProxySection.model_validate({"hijack_https": {"hosts": ["("]}})
    with pytest.raises(ValidationError, match="allowed_hosts: invalid registry"):  # named, not just "proxy"
        ProxySection.model_validate({"allowed_hosts": ["::::"]})
    # Taken before, then every request failed: a 502 connecting to "not a url", a 403 for "*"
    with pytest.raises(ValidationError, match="registry_mirror: invalid registry 'not a url'"):
        ProxySection.model_validate({"registry_mirror": "not a url"})
    with pytest.raises(ValidationError, match=r"allowed_hosts: invalid registry '\*': not a host name"):
        ProxySection.model_validate({"allowed_hosts": ["*"]})


@pytest.mark.parametrize("host", ["registry.example.com", "127.0.0.1"])
def test_host_certificates_pass_a_client_that_trusts_the_ca(tmp_path: Path, host: str) -> None:
    cert, key, ca_path = load_or_create_ca("", "", tmp_path)
    certs = HostCertificates(cert, key, tmp_path)
    server_context = certs.context_for(f"{host}:443", host)
    assert certs.context_for(f"{host}:443", host) is server_context
    assert certs.authority_of(server_context) == f"{host}:443"
    client_context = ssl.create_default_context(cafile=str(ca_path))
    server_sock, client_sock = socket.socketpair()

    def serve() -> None:
        with server_context.wrap_socket(server_sock, server_side=True) as tls:
            tls.sendall(tls.recv(5))

    thread = threading.Thread(target=serve)
    thread.start()
    with client_context.wrap_socket(client_sock, server_hostname=host) as tls:
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
    thread.join(timeout=10)
    server_sock, client_sock = socket.socketpair()
    other = threading.Thread(target=_handshake_quietly, args=(server_context, server_sock))
    other.start()
    with pytest.raises(ssl.SSLCertVerificationError):  # another name: the certificate does not cover it
        client_context.wrap_socket(client_sock, server_hostname="elsewhere.example")
    client_sock.close()
    other.join(timeout=10)
    assert not list(tmp_path.glob(".leaf-*"))  # the temporary chain file is gone


def _handshake_quietly(context: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with context.wrap_socket(sock, server_side=True):
            pass
    except (ssl.SSLError, OSError):
        pass


def test_a_connect_target_resolving_only_to_link_local_is_forbidden() -> None:
    with pytest.raises(Forbidden):
        asyncio.run(open_upstream("169.254.169.254", 443, never_upstream, timeout_s=1))


def test_accept_loop_dispatches_by_first_bytes_and_survives_resets(caplog: pytest.LogCaptureFixture) -> None:
    """Plain requests and CONNECTs reach their handlers; a client resetting mid-head logs no error."""
    seen: list[str] = []

    async def run() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        done, reading = asyncio.Event(), asyncio.Event()

        async def on_plain(conn: socket.socket) -> None:
            seen.append("plain")
            conn.close()
            done.set()

        async def on_connect(conn: socket.socket) -> None:
            seen.append("connect")
            reading.set()
            try:
                await read_head(conn)  # the client resets while we wait for the rest: OSError
            except BadRequest:  # or the reset reads as an orderly close (as server.py handles it)
                pass
            finally:
                done.set()

        serving = asyncio.create_task(accept_loop(listener, on_plain, on_connect))
        for first in (b"GET / HTTP/1.1\r\n\r\n", b"CONNECT a:443 HTTP/1.1\r\n"):
            done.clear()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first)
            await writer.drain()
            if first.startswith(b"CONNECT"):
                await reading.wait()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            writer.close()
            async with asyncio.timeout(5):
                await done.wait()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        listener.close()

    with caplog.at_level(logging.DEBUG, logger="dfly.daemon.proxy.connect"):
        asyncio.run(run())
    assert seen == ["plain", "connect"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class CountingSocket(socket.socket):
    peeks = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            self.peeks += 1
        return super().recv(bufsize, flags)


def test_a_stalled_partial_connect_is_peeked_with_backoff() -> None:
    """A client that sent "C" and stopped (or closed) kept the dispatcher peeking every 10 ms."""

    async def run() -> None:
        ours, theirs = socket.socketpair()
        counted = CountingSocket(fileno=ours.detach())
        counted.setblocking(False)
        with counted, theirs:
            theirs.sendall(b"C")
            theirs.shutdown(socket.SHUT_WR)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await _starts_with_connect(counted)
            assert counted.peeks <= 12  # 10 ms doubling to 200 ms; every 10 ms it was ~100

    asyncio.run(run())


def test_a_connect_sent_a_byte_at_a_time_is_recognised() -> None:
    async def run() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with ours, theirs:

            async def trickle() -> None:
                for byte in b"CONNECT ":
                    theirs.sendall(bytes([byte]))
                    await asyncio.sleep(0.005)

            sender = asyncio.create_task(trickle())
            async with asyncio.timeout(5.0):
                assert await _starts_with_connect(ours)
            await sender

    asyncio.run(run())


def test_a_tunnel_with_traffic_stays_and_an_idle_one_is_closed() -> None:
    """The deadline moves with every chunk either way: bytes every 0.1 s keep a 0.4 s tunnel open for
    longer than 0.4 s; then silence closes both sides."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        client_near, client_far = socket.socketpair()
        upstream_near, upstream_far = socket.socketpair()
        for sock in (client_near, upstream_near, client_far, upstream_far):
            sock.setblocking(False)
        relay = asyncio.create_task(tunnel(client_near, upstream_near, b"", idle_s=0.4))
        started = loop.time()
        for _ in range(8):  # 0.8 s of traffic, upstream to client
            await loop.sock_sendall(upstream_far, b"x")
            assert await loop.sock_recv(client_far, 16) == b"x"
            await asyncio.sleep(0.1)
        assert not relay.done()
        async with asyncio.timeout(5):
            await relay  # then idle: closed after 0.4 s
        assert loop.time() - started >= 0.8
        assert await loop.sock_recv(client_far, 16) == b""  # the client sees the close
        for sock in (client_far, upstream_far):
            sock.close()

    asyncio.run(run())


def test_connections_beyond_the_cap_are_closed_at_accept(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        release, held = asyncio.Event(), asyncio.Event()

        async def hold(conn: socket.socket) -> None:
            held.set()
            await release.wait()
            conn.close()

        serving = asyncio.create_task(accept_loop(listener, hold, hold, max_connections=1))
        _, first = await asyncio.open_connection("127.0.0.1", port)
        first.write(b"GET / HTTP/1.1\r\n\r\n")
        async with asyncio.timeout(5):
            await held.wait()
        second_reader, second = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await second_reader.read() == b""  # closed at once
        release.set()
        for writer in (first, second):
            writer.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        listener.close()

    with caplog.at_level(logging.WARNING, logger="dfly.daemon.proxy.connect"):
        asyncio.run(run())
    assert any("proxy.max_connections" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("status", "line"),
    [(200, "HTTP/1.1 200 Connection Established"), (400, "HTTP/1.1 400 Bad Request"),
     (403, "HTTP/1.1 403 Forbidden"), (407, "HTTP/1.1 407 Proxy Authentication Required")],
)  # fmt: skip
def test_a_connect_answer_has_the_standard_reason_phrase(status: int, line: str) -> None:
    async def run() -> bytes:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            await reply(ours, status, {"X-Dragonfly-Error-Type": "x"} if status != 200 else None)
            return theirs.recv(4096)

    head = asyncio.run(run()).decode()
    assert head.split("\r\n")[0] == line
    assert head.endswith("\r\n\r\n")
