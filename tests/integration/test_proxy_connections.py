"""The proxy port's own HTTP hygiene: connections that never complete a request, request bodies that
stop and P2P responses nobody reads end after `proxy.idle_timeout_s`; requests aiohttp cannot parse are
one INFO line in the log, not an ERROR with a traceback per request.

Real daemon (LocalCluster, one peer) with `proxy.idle_timeout_s` at 1 s; raw sockets as clients; the
daemon's side of a connection observed with iproute2's `ss` (installed by .ci/run).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import wait_until

from dfly.cluster import LocalCluster
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

IDLE_TIMEOUT_S = 1.0
BIG_BYTES = 64 * MiB


class BodyReader:
    """An upstream that reads a request's whole body before it answers (as a registry does an upload)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/upload"
        self.connected = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            self.connected.set()
            data = b""
            while not data.endswith(b"\r\n0\r\n\r\n") and (chunk := conn.recv(65536)):
                data += chunk
            if data.endswith(b"\r\n0\r\n\r\n"):
                conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        self.ended.set()


class HeadRecorder:
    """An upstream that keeps each request's head, reads a Content-Length body and answers 201."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.heads: queue.Queue[dict[str, str]] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {
                        k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
                    }
                    headers[":request"] = lines[0]
                    while len(body) < int(headers.get("content-length", "0")) and (chunk := conn.recv(65536)):
                        body += chunk
                    headers[":body-bytes"] = str(len(body))
                    self.heads.put(headers)
                    conn.sendall(self.answer(lines[0].split(" ")[1]))

    @staticmethod
    def answer(path: str) -> bytes:
        if path.endswith("/chunked.bin"):  # no Content-Length: cannot be a P2P task
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
        if path.endswith("/big-head"):  # a 20 KB header line and 300 fields: curl takes them
            fields = b"".join(b"X-Field-%d: %d\r\n" % (n, n) for n in range(300))
            return (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 20_000 + b"\r\n" + fields +
                    b"Content-Length: 2\r\nConnection: close\r\n\r\nok")  # fmt: skip
        if path.endswith("/untyped"):  # no Content-Type, no Server, no Date
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        if path.endswith("/private.bin"):
            return (b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="files"\r\n'
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
        return b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def head_of(self, start: str) -> dict[str, str]:
        """The next request head whose request line starts so (others, e.g. earlier tests' or a seed's
        reads, are skipped)."""
        while not (seen := self.heads.get(timeout=10))[":request"].startswith(start):
            pass
        return seen


@pytest.fixture(scope="module")
def head_recorder() -> Iterator[HeadRecorder]:
    recorder = HeadRecorder()
    yield recorder
    recorder.listener.close()


@pytest.fixture(scope="module")
def body_reader() -> Iterator[BodyReader]:
    reader = BodyReader()
    yield reader
    reader.listener.close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    with Origin(tmp_path_factory.mktemp("www")) as server:
        assert server.root is not None
        make_file(server.root / "big.bin", BIG_BYTES, seed=5)
        yield server


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    body_reader: BodyReader,
    origin: Origin,
    head_recorder: HeadRecorder,
) -> Iterator[LocalCluster]:
    allowed = [body_reader.url.removesuffix("/upload"), origin.url("/").rstrip("/"), head_recorder.url]
    proxy = {"idle_timeout_s": IDLE_TIMEOUT_S, "allowed_hosts": allowed, "rules": [r"\.bin$"]}
    overrides = {"*": {"proxy": proxy}}
    with LocalCluster(tmp_path_factory.mktemp("c"), peers=1, daemon_overrides=overrides) as running:
        yield running


def daemon_side_closed(daemon_port: int, client_port: int) -> bool:
    """Whether the daemon closed its end of our connection (iproute2's `ss`: it sits in FIN-WAIT-1)."""
    argv = ["ss", "-Htn", "state", "fin-wait-1", f"( sport = :{daemon_port} and dport = :{client_port} )"]
    return bool(subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout.strip())


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


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        # aiohttp's message for this one quotes the header and a caret on lines of their own
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
        # too long: aiohttp's message quotes the start of the line, credentials included
        b"GET http://alice:TopSecretPw@127.0.0.1:9/x?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://127.0.0.1:9/x HTTP/1.1\r\nProxy-Authorization: Basic U2VjcmV0"
        + b"a" * 9000
        + b"\r\n\r\n",
    ],
)
def test_unparsable_requests_are_one_info_line_each(cluster: LocalCluster, bad: bytes) -> None:
    peer = cluster.peers[0]
    before = len(peer.log_path.read_text(errors="replace"))
    _, received = closed_after(peer.ports["proxy"], bad)
    assert received.split(b" ", 2)[1] == b"400"
    log = peer.log_path.read_text(errors="replace")
    new = [line for line in log[before:].splitlines() if line.strip()]
    [line] = [line for line in new if "Error handling request" in line]
    assert " INFO " in line
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in new), new  # every record on one line
    assert "Traceback" not in log
    assert "TopSecretPw" not in log
    assert "U2VjcmV0" not in log


def test_a_malformed_chunked_body_does_not_hang(cluster: LocalCluster, body_reader: BodyReader) -> None:
    """The body goes bad after forwarding began: aiohttp drops it without ending the stream, and the
    forwarded request (to an upstream that answers only after the whole body) waited forever. Now it
    ends once the body has been idle for the idle timeout: 502, the upstream's connection closed."""
    port = cluster.peers[0].ports["proxy"]
    with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT_S + 10) as sock:
        sock.sendall(
            b"POST "
            + body_reader.url.encode()
            + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        assert body_reader.connected.wait(10)  # forwarding has begun: the bad chunk comes separately
        sock.sendall(b"5\r\nhello\r\nzz\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.split(b" ", 2)[1] == b"502"
    assert body_reader.ended.wait(10)  # the upstream saw its connection end, not a body that never ends


def test_a_client_that_stops_reading_a_p2p_download_is_dropped(cluster: LocalCluster, origin: Origin) -> None:
    """The daemon waited forever for a client that stopped reading (an fd and a task held per such
    client). A chunk not taken within idle_timeout_s per MiB now ends the response: a short body."""
    port = cluster.peers[0].ports["proxy"]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # fills at once
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET " + origin.url("/big.bin").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        received = sock.recv(65536)
        assert received.split(b" ", 2)[1] == b"200"
        # Read nothing until the daemon has closed its side (its socket then waits in FIN-WAIT-1 behind
        # the bytes we do not take): within 4 s for a 4 MiB chunk; without the limit it never closes.
        ours = sock.getsockname()[1]
        deadline = time.monotonic() + IDLE_TIMEOUT_S * 4 + 10
        while not daemon_side_closed(port, ours) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += chunk
    assert len(received) < BIG_BYTES  # cut off, not the whole body


def test_a_forwarded_request_keeps_its_length_and_gains_no_headers(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """An upload with Content-Length reaches the upstream with it, not re-chunked (S3-style presigned PUTs
    answer 411 to chunked bodies); the proxy adds no Accept-Encoding (the client would get a compressed
    body it never asked for) and no User-Agent of its own."""
    port = cluster.peers[0].ports["proxy"]
    body = os.urandom(100_000)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            f"PUT {head_recorder.url}/bucket/key HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        assert sock.recv(65536).split(b" ", 2)[1] == b"201"
    seen = head_recorder.head_of("PUT ")
    assert seen[":request"].startswith("PUT /bucket/key ")
    assert seen.get("content-length") == str(len(body))
    assert "transfer-encoding" not in seen
    assert seen[":body-bytes"] == str(len(body))
    assert "accept-encoding" not in seen
    assert "user-agent" not in seen
    assert "accept" not in seen  # aiohttp's client added `Accept: */*`
    assert "content-type" not in seen  # and `Content-Type: application/octet-stream` to a body


def get_through(port: int, url: str) -> tuple[bytes, bytes]:
    """GET `url` through the forward proxy on `port`, one connection: the answer's head and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


def test_an_upstream_answer_with_large_headers_is_passed_on(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """aiohttp's client refused header lines over 8 KiB and more than 128 fields: the client got 502."""
    head, body = get_through(cluster.peers[0].ports["proxy"], f"{head_recorder.url}/big-head")
    assert head.split(b" ", 2)[1] == b"200", head[:300]
    assert b"X-Big: " + b"b" * 20_000 in head
    assert b"X-Field-299: 299" in head
    assert body == b"ok"


def test_an_untyped_upstream_answer_is_relayed_untyped(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """aiohttp gives every answer without a Content-Type `application/octet-stream`, and a `Server` of its
    own: relayed so, a client would no longer sniff the body's type as it does without the proxy."""
    head, body = get_through(cluster.peers[0].ports["proxy"], f"{head_recorder.url}/untyped")
    fields = {line.partition(b":")[0].strip().lower() for line in head.split(b"\r\n")[1:]}
    assert head.split(b" ", 2)[1] == b"200", head[:300]
    assert body == b"hello"
    assert b"content-type" not in fields
    assert b"server" not in fields
    assert b"date" in fields  # a forwarding recipient adds it (RFC 9110 §6.6.1)


def test_an_upper_case_scheme_is_the_forward_proxy(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """A URI scheme is case-insensitive: `GET HTTP://host/x` was taken for a mirror path (400)."""
    port = cluster.peers[0].ports["proxy"]
    target = "HTTP://" + head_recorder.url.removeprefix("http://") + "/upper"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert sock.recv(65536).split(b" ", 2)[1] == b"201"
    assert head_recorder.head_of("GET /upper")[":request"] == "GET /upper HTTP/1.1"


def test_100_continue_only_once_the_request_is_allowed(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """`Expect: 100-continue` is answered when the body is wanted: a refused request gets its 403 with no
    100 before it (the client would have started uploading); an allowed one gets 100, then the answer."""
    port = cluster.peers[0].ports["proxy"]
    body = b"x" * 1000

    def exchange(url: str) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = f"PUT {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            head += "\r\n"
            sock.sendall(head.encode())
            first = sock.recv(65536)  # the client waits for this before its body
            if not first.startswith(b"HTTP/1.1 100 "):
                return first, b""
            sock.sendall(body)
            return first, sock.recv(65536)

    refused, _ = exchange("http://127.0.0.2:9/upload")
    assert refused.split(b" ", 2)[1] == b"403", refused[:200]
    interim, final = exchange(f"{head_recorder.url}/continued")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.split(b" ", 2)[1] == b"201"
    seen = head_recorder.head_of("PUT /continued")
    assert seen[":body-bytes"] == str(len(body))
    assert "expect" not in seen  # answered by the proxy: an upstream that sends no 100 would stall it


def test_credentials_in_a_proxied_url_are_refused(cluster: LocalCluster, origin: Origin) -> None:
    """RFC 9110 has no userinfo in http URLs; kept, it would be stored with a P2P task (and aiohttp failed
    on some forms with a 500 and a traceback)."""
    port = cluster.peers[0].ports["proxy"]
    target = origin.url("/big.bin").replace("http://", "http://user:secret@")
    for url in (target, origin.url("/x").replace("http://", "http://127.0.0.2%3a1@")):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.split(b" ", 2)[1] == b"400", received[:200]
        assert b"Authorization header" in received
    assert "Traceback" not in cluster.peers[0].log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("path", "status", "body", "header"),
    [
        ("/chunked.bin", "200", b"hello", ""),
        ("/private.bin", "401", b"", 'www-authenticate: basic realm="files"'),
    ],
)
def test_what_cannot_go_through_p2p_is_forwarded_directly(
    cluster: LocalCluster,
    head_recorder: HeadRecorder,
    tmp_path: Path,
    path: str,
    status: str,
    body: bytes,
    header: str,
) -> None:
    """A rule-matching GET whose origin answers without a length (chunked) or with an error such as 401:
    the client gets the origin's own answer (with its WWW-Authenticate), not a 502 from the swarm."""
    port = cluster.peers[0].ports["proxy"]
    out = tmp_path / "out"
    argv = [
        "curl",
        "-s",
        "-x",
        f"http://127.0.0.1:{port}",
        "-o",
        str(out),
        "-D",
        "-",
        head_recorder.url + path,
    ]
    head = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    assert head.split()[1] == status, head
    assert out.read_bytes() == body
    assert header in head.lower()


def test_keep_alive_connections_count_toward_the_cap(tmp_path: Path) -> None:
    """proxy.max_connections counts the HTTP connections aiohttp keeps alive, not only those being
    accepted: with two open, a third is closed at once; once one closes, a new one is served."""
    overrides = {"*": {"proxy": {"max_connections": 2}}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as capped:
        port = capped.peers[0].ports["proxy"]

        def ping(sock: socket.socket) -> bytes:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                return sock.recv(65536)
            return b""

        def served_anew() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
                return ping(again).startswith(b"HTTP/1.1 200")

        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for sock in held:  # a complete request each, then kept alive
            assert ping(sock).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            assert ping(third) == b""  # closed at accept
        held.pop().close()
        wait_until("a freed slot is taken again", served_anew, timeout_s=10)  # once the daemon saw the close
        for sock in held:
            sock.close()
        assert "proxy.max_connections" in capped.peers[0].log_path.read_text()


def test_a_passed_through_request_keeps_its_query_as_sent(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """Only containerd's `ns` is taken out; a bare key stays bare and the order is the client's."""
    port = cluster.peers[0].ports["proxy"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (f"GET /v2/demo/tags/list?b&ns=docker.io&n=10&last=a%2Fb HTTP/1.1\r\nHost: x\r\n"
                f"X-Dragonfly-Registry: {head_recorder.url}\r\nConnection: close\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode())
        assert sock.recv(65536).split(b" ", 2)[1] == b"201"
    seen = head_recorder.head_of("GET /v2/demo/tags/list")
    assert seen[":request"] == "GET /v2/demo/tags/list?b&n=10&last=a%2Fb HTTP/1.1"


def test_an_absolute_url_without_a_path_is_forwarded(
    cluster: LocalCluster, head_recorder: HeadRecorder
) -> None:
    """`GET http://host HTTP/1.1` is a valid absolute-form target (RFC 9112 §3.2.2: the path is "/"); it
    got aiohttp's 404 because its router matches only targets starting with "/"."""
    port = cluster.peers[0].ports["proxy"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {head_recorder.url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.split(b" ", 2)[1] == b"201", received[:200]
    assert head_recorder.head_of("GET ")[":request"] == "GET / HTTP/1.1"
