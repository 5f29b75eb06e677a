"""Back-to-source HTTP client against a real origin: a 64 MiB file in 1 MiB pieces, resume, HTTPS.

Byte accounting: `stat` asks for `Range: bytes=0-0`, so the origin sends 1 body byte for it; a full read
then sends exactly the file. The throughput line compares `read_pieces` with `urllib.request` reading
the same file from the same origin (both computing CRC-32); only the ratio is meaningful.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import needs_ipv6

from dfly.common.errors import SourceError
from dfly.daemon.source.http import SourceStat, read_pieces, stat
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SIZE = 64 * MiB


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    root = tmp_path_factory.mktemp("origin")
    make_file(root / "blob.bin", SIZE, seed=3)
    data = (root / "blob.bin").read_bytes()
    return root, [zlib.crc32(data[i : i + MiB]) for i in range(0, SIZE, MiB)]


@pytest.fixture
def origin(blob: tuple[Path, list[int]]) -> Iterator[Origin]:
    with Origin(blob[0]) as server:
        yield server


def sent_when_idle(origin: Origin) -> int:
    """The origin's byte count once none of its connections is open. It counts after each send returns,
    which may be a moment after the client already has the bytes (or, for the stat, has closed without
    reading); the client closes its connection after each call, and once the origin's handler of every
    connection has ended, nothing more can be counted."""
    deadline = time.monotonic() + 5
    while True:
        with origin._lock:
            open_connections = len(origin._conns)
        if not open_connections:
            return origin.bytes_sent
        if time.monotonic() > deadline:
            pytest.fail(f"the origin still has {open_connections} connection(s) open after 5 s")
        time.sleep(0.005)


def read(st: SourceStat, first: int = 0, **kw: object) -> dict[int, int]:
    crcs: dict[int, int] = {}

    def on_piece(number: int, view: memoryview, crc: int) -> None:
        assert len(view) == MiB
        crcs[number] = crc

    delivered = read_pieces(st, {}, piece_length=MiB, first_piece=first, buffer=bytearray(MiB),
                            on_piece=on_piece, should_stop=lambda: False, timeout_s=30, **kw)  # type: ignore[arg-type]  # fmt: skip
    assert delivered == (SIZE // MiB - first) * MiB
    return crcs


def test_whole_file_in_pieces(origin: Origin, blob: tuple[Path, list[int]]) -> None:
    st = stat(origin.url("blob.bin"), {"User-Agent": "dfly-test"}, timeout_s=10)
    assert st.content_length == SIZE
    assert st.accept_ranges
    assert st.etag
    crcs = read(st)
    assert crcs == dict(enumerate(blob[1]))
    assert sent_when_idle(origin) == SIZE + 1  # +1: the stat's `Range: bytes=0-0`
    assert origin.requests == 2


@needs_ipv6
def test_an_ipv6_origin(blob: tuple[Path, list[int]]) -> None:
    with Origin(blob[0], host="::1") as server:
        url = server.url("blob.bin")
        assert url.startswith("http://[::1]:")
        st = stat(url, {}, timeout_s=10)
        assert st.content_length == SIZE
        assert read(st) == dict(enumerate(blob[1]))


def test_resume_from_a_middle_piece(origin: Origin, blob: tuple[Path, list[int]]) -> None:
    st = stat(origin.url("blob.bin"), {}, timeout_s=10)
    assert sent_when_idle(origin) == 1
    origin.reset_stats()
    crcs = read(st, first=40)
    assert crcs == {n: blob[1][n] for n in range(40, 64)}
    (record,) = origin.request_log()
    assert record.headers["Range"] == f"bytes={40 * MiB}-{SIZE - 1}"
    assert record.headers["If-Range"] == st.etag
    assert sent_when_idle(origin) == 24 * MiB


def best_of(runs: int, fn: object) -> float:
    assert callable(fn)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_throughput_against_urllib(origin: Origin, capsys: pytest.CaptureFixture[str]) -> None:
    url = origin.url("blob.bin")
    st = stat(url, {}, timeout_s=10)

    def with_urllib() -> None:
        crc = 0
        with urllib.request.urlopen(url, timeout=30) as resp:
            while chunk := resp.read(MiB):
                crc = zlib.crc32(chunk, crc)

    ours = best_of(3, lambda: read(st))
    theirs = best_of(3, with_urllib)
    ratio = theirs / ours
    with capsys.disabled():
        print(f"\nback-to-source read_pieces {SIZE / MiB / ours:.0f} MiB/s, "
              f"urllib {SIZE / MiB / theirs:.0f} MiB/s, ratio {ratio:.2f}x "
              "(64 MiB, 1 MiB pieces, CRC-32 in both)")  # fmt: skip
    assert ratio > 0.5, "read_pieces should not be much slower than urllib"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:  # the venv has no `cryptography`; openssl is the only certificate source here
        pytest.skip("HTTPS test needs the openssl command to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
    return cert, key


def test_https(blob: tuple[Path, list[int]], tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    with Origin(blob[0], certfile=cert, keyfile=key) as origin:
        url = origin.url("blob.bin")
        assert url.startswith("https://")
        with pytest.raises(
            SourceError, match=f"TLS certificate of origin 127.0.0.1:{origin.port} not trusted"
        ):
            stat(url, {}, timeout_s=10)
        assert stat(url, {}, timeout_s=10, insecure_skip_verify=True).content_length == SIZE
        st = stat(url, {}, timeout_s=10, ca_file=str(cert))
        start = time.perf_counter()
        crcs = read(st, first=48, ca_file=str(cert))
        elapsed = time.perf_counter() - start
        assert crcs == {n: blob[1][n] for n in range(48, 64)}
        print(f"HTTPS read_pieces {16 / elapsed:.0f} MiB/s")
