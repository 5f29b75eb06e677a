"""The devtools Origin: ranges, If-Range, HEAD, 404/416, byte counting, /_stats, faults, make_file."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.common.ranges import Unsatisfiable, parse_range
from dfly.devtools.origin import Origin, make_file, pseudo_random_bytes

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.bin").write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    with Origin(tmp_path) as server:
        yield server


def get(
    origin: Origin, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(origin.host, origin.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


DATA = bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("bytes=0-0", (0, 0)),
        ("bytes=10-19", (10, 19)),
        ("bytes=10-", (10, 10239)),
        ("bytes=-100", (10140, 10239)),
        ("bytes=-99999", (0, 10239)),
        ("bytes=10000-99999", (10000, 10239)),
        ("bytes=0-1,5-6", None),  # several ranges: the full body
        ("bytes=9-3", None),
        ("items=0-1", None),
        ("bytes=x-1", None),
        ("bytes=\u00b2-", None),  # '²' passes str.isdigit but is no number
        ("bytes=0-\u0663", None),  # an Arabic-Indic digit
        ("bytes=0-" + "9" * 5000, (0, 10239)),  # past any object: to the end (int() refuses 4,300 digits)
        ("bytes=-" + "9" * 5000, (0, 10239)),
    ],
)
def test_parse_range(header: str, want: tuple[int, int] | None) -> None:
    assert parse_range(header, len(DATA)) == want


@pytest.mark.parametrize(
    "header", ["bytes=10240-", "bytes=20000-30000", "bytes=-0", "bytes=" + "1" * 5000 + "-"]
)
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, len(DATA))


def test_range_and_full_get(origin: Origin) -> None:
    status, headers, body = get(origin, "/sub/f.bin", {"Range": "bytes=100-199"})
    assert (status, body) == (206, DATA[100:200])
    assert headers["Content-Range"] == "bytes 100-199/10240"
    assert headers["Content-Length"] == "100"
    status, headers, body = get(origin, "/sub/f.bin")
    assert (status, body) == (200, DATA)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"]
    assert headers["Last-Modified"]


def test_if_range(origin: Origin) -> None:
    etag = get(origin, "/sub/f.bin", method="HEAD")[1]["ETag"]
    status, _, body = get(origin, "/sub/f.bin", {"Range": "bytes=5-9", "If-Range": etag})
    assert (status, body) == (206, DATA[5:10])
    status, _, body = get(origin, "/sub/f.bin", {"Range": "bytes=5-9", "If-Range": '"other"'})
    assert (status, body) == (200, DATA)


def test_head_404_416_and_traversal(origin: Origin) -> None:
    status, headers, body = get(origin, "/sub/f.bin", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "10240", b"")
    assert get(origin, "/nope")[0] == 404
    assert get(origin, "/../etc/passwd")[0] == 404
    assert get(origin, "/sub")[0] == 404
    status, headers, _ = get(origin, "/sub/f.bin", {"Range": "bytes=10240-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */10240")


def test_counts_body_bytes_and_requests(origin: Origin) -> None:
    get(origin, "/sub/f.bin", {"Range": "bytes=0-0"})
    get(origin, "/sub/f.bin")
    get(origin, "/sub/f.bin", method="HEAD")
    get(origin, "/nope")
    deadline = time.monotonic() + 5  # the server counts after each send returns: maybe after our read
    while origin.bytes_sent < 10241 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert origin.bytes_sent == 1 + 10240
    assert origin.requests == 4
    status, _, body = get(origin, "/_stats")
    stats = json.loads(body)
    assert status == 200
    assert stats == {"bytes_sent": 10241, "requests": 4, "by_path": {"/sub/f.bin": 10241}}
    origin.reset_stats()
    assert origin.bytes_sent == 0
    assert origin.requests == 0


def test_keep_alive_serves_several_requests_on_one_connection(origin: Origin) -> None:
    conn = http.client.HTTPConnection(origin.host, origin.port, timeout=5)
    try:
        for i in range(3):
            conn.request("GET", "/sub/f.bin", headers={"Range": f"bytes={i}-{i}"})
            assert conn.getresponse().read() == DATA[i : i + 1]
    finally:
        conn.close()


def test_drop_after_cuts_the_body(origin: Origin) -> None:
    origin.drop_after("sub/f.bin", 1000)
    conn = http.client.HTTPConnection(origin.host, origin.port, timeout=5)
    try:
        conn.request("GET", "/sub/f.bin")
        with pytest.raises(http.client.IncompleteRead):
            conn.getresponse().read()
    finally:
        conn.close()
    assert origin.bytes_sent == 1000


def test_url_keeps_query_and_quotes_path(origin: Origin) -> None:
    assert origin.url("a b.bin?v=1") == f"{origin.base_url}/a%20b.bin?v=1"
    assert get(origin, "/sub/f.bin?v=1")[0] == 200


def test_rate_limit_paces_bodies(tmp_path: Path) -> None:
    (tmp_path / "r.bin").write_bytes(bytes(512 * KiB))
    with Origin(tmp_path, rate_limit_bytes_per_s=2 * MiB) as server:
        start = time.monotonic()
        assert len(get(server, "/r.bin")[2]) == 512 * KiB
        elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 2.0  # 0.25 s at 2 MiB/s


def test_make_file_is_deterministic_and_pieces_differ(tmp_path: Path) -> None:
    size = 3 * MiB + 123
    sha = make_file(tmp_path / "a", size, seed=5)
    data = (tmp_path / "a").read_bytes()
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha
    assert make_file(tmp_path / "b", size, seed=5) == sha
    assert make_file(tmp_path / "c", size, seed=6) != sha
    assert pseudo_random_bytes(size, seed=5) == data
    blocks = {data[i : i + 4 * KiB] for i in range(0, 3 * MiB, 4 * KiB)}
    assert len(blocks) == 3 * MiB // (4 * KiB)


def test_cli_writes_ready_file_and_serves(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes(b"hello")
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "dfly.devtools.origin", "--root", str(tmp_path), "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        info = json.loads(ready.read_text())
        assert info["url"] == url
        assert info["role"] == "origin"
        assert info["pid"] == proc.pid
        conn = http.client.HTTPConnection("127.0.0.1", info["ports"]["http"], timeout=5)
        conn.request("GET", "/x.txt")
        assert conn.getresponse().read() == b"hello"
        conn.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    assert not os.path.exists(str(ready) + ".tmp")
