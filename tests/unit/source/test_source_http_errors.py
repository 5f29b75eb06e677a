"""Back-to-source HTTP client against the real in-process Origin: redirects, statuses, changed objects,
content encodings, dropped connections, stop requests, range-less origins and unreachable origins."""

from __future__ import annotations

import os
import re
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.common.errors import SourceError, SourceRefused
from dfly.daemon.proxy.forward import hop_guard
from dfly.daemon.source.http import MAX_REDIRECTS, SourceStat, read_pieces, stat
from dfly.daemon.source.http_open import HostGuard
from dfly.devtools.origin import Origin, make_file, pseudo_random_bytes

KiB = 1024


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path) as server:
        yield server


def read_all(st: SourceStat, *, piece_length: int = 64 * KiB, first: int = 0, **kw: object) -> dict[int, int]:
    crcs: dict[int, int] = {}

    def on_piece(number: int, view: memoryview, crc: int) -> None:
        assert crc == zlib.crc32(view)
        crcs[number] = crc

    read_pieces(st, {}, piece_length=piece_length, first_piece=first, buffer=bytearray(piece_length),
                on_piece=on_piece, should_stop=lambda: False, timeout_s=5, **kw)  # type: ignore[arg-type]  # fmt: skip
    return crcs


def test_404_is_a_source_error_with_status(origin: Origin) -> None:
    with pytest.raises(SourceError) as info:
        stat(origin.url("missing.bin"), {}, timeout_s=5)
    assert info.value.status_code == 404
    assert str(info.value) == f"origin returned 404 Not Found for {origin.url('missing.bin')}"


def test_error_message_leaves_out_the_query_string(origin: Origin) -> None:
    with pytest.raises(SourceError) as info:
        stat(origin.url("missing.bin") + "?X-Amz-Signature=secret", {}, timeout_s=5)
    assert "secret" not in str(info.value)
    assert "?…" in str(info.value)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_followed_and_final_url_kept(origin: Origin, status: int) -> None:
    target = origin.add_bytes("real.bin", b"a" * 300)
    start = origin.add_redirect("start", "/real.bin", status)
    st = stat(start, {}, timeout_s=5)
    assert st.url == target
    assert st.content_length == 300
    assert len(read_all(st)) == 1
    assert [r.path for r in origin.request_log()] == ["/start", "/real.bin", "/real.bin"]


def chain(origin: Origin, hops: int) -> str:
    origin.add_bytes("end", b"z" * 10)
    for i in range(hops):
        origin.add_redirect(f"hop{i}", f"/hop{i + 1}" if i + 1 < hops else "/end")
    return origin.url("hop0")


def test_redirect_limit_allows_ten(origin: Origin) -> None:
    assert stat(chain(origin, MAX_REDIRECTS), {}, timeout_s=5).content_length == 10


def test_redirect_limit_refuses_eleven(origin: Origin) -> None:
    with pytest.raises(SourceError, match="too many redirects") as info:
        stat(chain(origin, MAX_REDIRECTS + 1), {}, timeout_s=5)
    assert info.value.status_code == 302
    assert origin.requests == MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("http://[::1", "to an invalid URL"),  # urljoin raised ValueError: an internal error in dfget
        (
            "http://a..b/x?X-Amz-Signature=secret",
            "invalid host name in the origin's redirect to http://a..b/x",
        ),
        ("http://" + "a" * 64 + ".example/x", "a label of the name is empty or over 63 characters"),
    ],
)
def test_a_redirect_to_a_url_nothing_can_fetch_is_a_source_error(
    origin: Origin, location: str, message: str
) -> None:
    url = origin.add_redirect("start", location)
    with pytest.raises(SourceError, match=re.escape(message)) as info:
        stat(url, {}, timeout_s=5)
    assert "secret" not in str(info.value)


def test_a_host_name_nothing_resolves_is_a_source_error() -> None:
    with pytest.raises(SourceError, match=r"invalid host name in http://a\.\.b/x: a label"):
        stat("http://a..b/x", {}, timeout_s=5)


def test_each_redirect_hop_is_checked_against_allowed_hosts(origin: Origin) -> None:
    origin.add_bytes("real.bin", b"a")
    url = origin.add_redirect("start", f"http://localhost:{origin.port}/real.bin")
    with pytest.raises(SourceError, match="localhost is not allowed"):
        stat(url, {}, timeout_s=5, allowed_hosts=HostGuard(lambda _s, host, _p: host == "127.0.0.1"))
    assert origin.requests == 1
    with pytest.raises(SourceError, match=r"127\.0\.0\.1 is not allowed"):
        stat(url, {}, timeout_s=5, allowed_hosts=HostGuard(lambda _s, host, _p: host == "localhost"))


def test_each_connection_is_checked_on_the_address_it_is_made_to(origin: Origin) -> None:
    """A name that passed the hop check can resolve differently when the connection is made (DNS
    rebinding): the address actually connected to is checked too, and nothing is sent to a refused one."""
    origin.add_bytes("real.bin", b"a")
    guard = HostGuard(lambda _s, _h, _p: True, lambda address: address == "127.0.0.1")
    with pytest.raises(SourceError, match=r"localhost resolves to 127\.0\.0\.1"):
        stat(f"http://localhost:{origin.port}/real.bin", {}, timeout_s=5, allowed_hosts=guard)
    assert origin.requests == 0
    assert stat(
        f"http://localhost:{origin.port}/real.bin", {}, timeout_s=5, allowed_hosts=HostGuard(guard.allowed)
    )


def test_cross_origin_redirect_drops_credentials(origin: Origin) -> None:
    origin.add_bytes("real.bin", b"a")
    url = origin.add_redirect("start", f"http://localhost:{origin.port}/real.bin")
    stat(url, {"Authorization": "Bearer t", "Cookie": "c=1", "X-Keep": "1"}, timeout_s=5)
    first, second = origin.request_log()
    assert first.headers["Authorization"] == "Bearer t"
    assert "Authorization" not in second.headers
    assert "Cookie" not in second.headers
    assert second.headers["X-Keep"] == "1"


def test_the_body_read_after_a_cross_origin_redirect_carries_no_credentials(origin: Origin) -> None:
    """A registry redirecting a blob to storage: the token never reaches the storage host, on the
    stat's hop nor on the body GET that starts at the redirect's target."""
    data = b"blob" * 1000
    origin.add_bytes("real.bin", data)
    url = origin.add_redirect("start", f"http://localhost:{origin.port}/real.bin")  # another origin
    headers = {"Authorization": "Bearer t", "Cookie": "c=1", "X-Keep": "1"}
    st = stat(url, headers, timeout_s=5)
    got = bytearray()
    read_pieces(st, headers, piece_length=len(data), buffer=bytearray(len(data)),
                on_piece=lambda _n, view, _crc: got.extend(view), should_stop=lambda: False,
                timeout_s=5)  # fmt: skip
    assert bytes(got) == data
    first, *later = origin.request_log()
    assert first.headers["Authorization"] == "Bearer t"
    assert len(later) == 2  # the stat's hop and the body
    for record in later:
        assert "Authorization" not in record.headers
        assert "Cookie" not in record.headers
        assert record.headers["X-Keep"] == "1"


def test_the_body_read_keeps_credentials_on_the_same_origin(origin: Origin) -> None:
    origin.add_bytes("real.bin", b"a" * 100)
    url = origin.add_redirect("start", origin.url("real.bin"))  # same scheme, host and port
    headers = {"Authorization": "Bearer t"}
    st = stat(url, headers, timeout_s=5)
    read_pieces(st, headers, piece_length=100, buffer=bytearray(100), on_piece=lambda *_: None,
                should_stop=lambda: False, timeout_s=5)  # fmt: skip
    assert [r.headers.get("Authorization") for r in origin.request_log()] == ["Bearer t"] * 3


def test_content_encoding_other_than_identity_is_refused(origin: Origin) -> None:
    url = origin.add_bytes("gz", b"\x1f\x8b" + bytes(100), headers={"Content-Encoding": "gzip"})
    with pytest.raises(SourceError, match="Content-Encoding gzip") as info:
        stat(url, {}, timeout_s=5)
    assert info.value.status_code == 206


def test_changed_object_fails_instead_of_mixing_versions(origin: Origin, tmp_path: Path) -> None:
    path = tmp_path / "obj.bin"
    make_file(path, 256 * KiB, seed=1)
    st = stat(origin.url("obj.bin"), {}, timeout_s=5)
    make_file(path, 256 * KiB, seed=2)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # same size: only the validators differ
    for first in (0, 2):  # the whole object, and a resume from the middle
        with pytest.raises(SourceError, match="origin object changed") as info:
            read_all(st, first=first)
        assert info.value.status_code == 200
    assert origin.request_log()[-1].headers["If-Range"] == st.etag


def test_weak_etag_falls_back_to_last_modified(origin: Origin) -> None:
    url = origin.add_bytes("weak", b"w" * 100)
    st = stat(url, {}, timeout_s=5)
    weak = SourceStat(st.url, st.content_length, st.headers, "W/" + st.etag, st.last_modified)
    read_all(weak)
    assert origin.request_log()[-1].headers["If-Range"] == st.last_modified


def test_dropped_connection_names_bytes_received_and_expected(origin: Origin) -> None:
    url = origin.add_bytes("cut", pseudo_random_bytes(200 * KiB))
    st = stat(url, {}, timeout_s=5)
    origin.drop_after("cut", 100 * KiB)
    got: list[int] = []
    with pytest.raises(SourceError, match=f"after {100 * KiB} of {200 * KiB} bytes") as info:
        read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(64 * KiB),
                    on_piece=lambda n, v, c: got.append(n), should_stop=lambda: False,
                    timeout_s=5)  # fmt: skip
    assert info.value.status_code == 0
    assert got == [0]  # the piece in flight is not delivered


def test_an_origin_that_stalls_mid_body_is_named_in_words(tmp_path: Path) -> None:
    """Headers and a few bytes, then nothing: the read timeout ends it with a sentence, not a class name."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(65536)
                if b"bytes=0-0" in head:
                    conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/131072\r\n"
                                 b"Content-Length: 1\r\n\r\nx")  # fmt: skip
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 131072\r\n\r\n" + bytes(1000))
                stop.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        st = stat(f"http://127.0.0.1:{port}/slow", {}, timeout_s=5)
        with pytest.raises(SourceError, match="the origin sent nothing for the read timeout after"):
            read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(64 * KiB), on_piece=lambda *_: None,
                        should_stop=lambda: False, timeout_s=0.5)  # fmt: skip
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_should_stop_ends_between_reads(origin: Origin) -> None:
    st = stat(origin.add_bytes("s", pseudo_random_bytes(4 * 64 * KiB)), {}, timeout_s=5)
    got: list[int] = []
    delivered = read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(64 * KiB),
                            on_piece=lambda n, v, c: got.append(n), should_stop=lambda: len(got) == 2,
                            timeout_s=5)  # fmt: skip
    assert got == [0, 1]
    assert delivered == 128 * KiB


def test_last_piece_is_short_and_last_piece_bound_is_honoured(origin: Origin) -> None:
    data = pseudo_random_bytes(3 * 64 * KiB + 5)
    st = stat(origin.add_bytes("odd", data), {}, timeout_s=5)
    crcs = read_all(st, first=1)
    assert crcs == {n: zlib.crc32(data[n * 64 * KiB : (n + 1) * 64 * KiB]) for n in (1, 2, 3)}
    assert origin.request_log()[-1].headers["Range"] == f"bytes={64 * KiB}-{len(data) - 1}"
    read_pieces(st, {}, piece_length=64 * KiB, first_piece=1, last_piece=1, buffer=bytearray(64 * KiB),
                on_piece=lambda *_: None, should_stop=lambda: False, timeout_s=5)  # fmt: skip
    assert origin.request_log()[-1].headers["Range"] == f"bytes={64 * KiB}-{128 * KiB - 1}"


def test_empty_object(origin: Origin) -> None:
    st = stat(origin.add_bytes("empty", b""), {}, timeout_s=5)
    assert st.content_length == 0
    assert st.headers["Content-Length"] == "0"
    assert read_all(st) == {}
    assert origin.requests == 1


def test_origin_without_range_support(origin: Origin) -> None:
    data = pseudo_random_bytes(5 * 64 * KiB)
    st = stat(origin.add_bytes("plain", data), {}, timeout_s=5)
    origin.ranges_enabled = False
    st = stat(st.url, {}, timeout_s=5)
    assert not st.accept_ranges
    assert st.content_length == len(data)
    crcs = read_all(st, first=3)  # the leading bytes are read and dropped
    assert crcs == {n: zlib.crc32(data[n * 64 * KiB : (n + 1) * 64 * KiB]) for n in (3, 4)}


def test_buffer_smaller_than_a_piece_is_refused(origin: Origin) -> None:
    st = stat(origin.add_bytes("b", b"b" * 10), {}, timeout_s=5)  # one piece of 10 bytes: 10 would do
    with pytest.raises(ValueError, match="cannot hold"):
        read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(9), on_piece=lambda *_: None,
                    should_stop=lambda: False, timeout_s=5)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_names_host_and_port() -> None:
    port = free_port()
    with pytest.raises(SourceError, match=f"connection refused by origin 127.0.0.1:{port}") as info:
        stat(f"http://127.0.0.1:{port}/x", {}, timeout_s=5)
    assert info.value.status_code == 0


def test_dns_failure_names_host_and_port() -> None:
    with pytest.raises(SourceError, match=r"cannot resolve origin host no-such-host\.invalid:80") as info:
        stat("http://no-such-host.invalid/x", {}, timeout_s=5)
    assert info.value.status_code == 0


def test_silent_origin_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        with pytest.raises(SourceError, match=f"origin 127.0.0.1:{port} did not answer within 0.2s") as info:
            stat(f"http://127.0.0.1:{port}/x", {}, timeout_s=0.2)
    assert info.value.status_code == 0


def test_unsupported_scheme() -> None:
    with pytest.raises(SourceError, match="unsupported source URL"):
        stat("ftp://example.com/x", {}, timeout_s=1)


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({f"X-Filler-{i}": "x" for i in range(150)}, "more than 100 headers"),
        ({"X-Huge": "x" * (70 * KiB)}, "more than 65536 bytes when reading header line"),
    ],
    ids=["too many headers", "header line too long"],
)
def test_oversized_response_headers_are_a_clear_source_error(
    origin: Origin, headers: dict[str, str], fragment: str
) -> None:
    url = origin.add_bytes("big-headers.bin", b"x" * 100, headers=headers)
    with pytest.raises(SourceError) as info:
        stat(url, {}, timeout_s=5)
    assert fragment in str(info.value).lower()
    assert url.rsplit("/", 1)[0].split("//")[1] in str(info.value)  # names the origin


def test_non_ascii_urls_are_sent_percent_encoded(origin: Origin) -> None:
    """An internationalized path (and host name) is sent as HTTP needs it, not a crash in the reader."""
    origin.add_bytes("café/é.bin", b"bonjour")
    got = stat(origin.url("/café/é.bin"), {}, timeout_s=5)
    assert got.content_length == len(b"bonjour")
    assert origin.request_log()[-1].target == "/caf%C3%A9/%C3%A9.bin"
    with pytest.raises(SourceError, match="cannot resolve"):
        stat("http://bücher.invalid/x", {}, timeout_s=5)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_a_guard_refusing_loopback_refuses_it_before_any_request(origin: Origin, host: str) -> None:
    """A seed reading for another host (hop_guard's refuse_loopback): a literal is refused before
    connecting, a name once it resolves there; the origin sees nothing. Without the flag it reads."""
    origin.add_bytes("f.bin", b"a" * 10)
    url = f"http://{host}:{origin.port}/f.bin"
    with pytest.raises(SourceRefused, match="loopback"):
        stat(url, {}, timeout_s=5, allowed_hosts=hop_guard((), refuse_loopback=True))
    assert not origin.request_log()
    if host != "[::ffff:127.0.0.1]":  # the test origin listens on IPv4 only
        assert stat(url, {}, timeout_s=5, allowed_hosts=hop_guard(())).content_length == 10
