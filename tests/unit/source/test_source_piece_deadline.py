"""Each piece read from an origin must arrive within the piece timeout (download.piece_timeout_s): an
origin that trickles bytes (each socket read well within the read timeout) or stalls mid-piece ends the
read with a sentence naming the piece, over HTTP and HTTPS; a slow origin whose pieces each arrive in
time is read to the end however long the whole takes; a stop ends a read blocked on a trickle at once."""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.common.errors import SourceError
from dfly.daemon.source.http import read_pieces, stat
from dfly.daemon.source.piece_deadline import STOP_POLL_S, PieceDeadline
from dfly.devtools.origin import Origin, pseudo_random_bytes
from dfly.devtools.pki import make_pki

pytestmark = pytest.mark.timeout(60)

KiB = 1024
SIZE = 128 * KiB


class Trickler:
    """An origin on a raw socket: answers the stat's `Range: bytes=0-0`, then sends a body's headers and
    one byte every `interval_s`, each within any read timeout, until the client goes away."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/trickle"
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(65536)
                if b"bytes=0-0" in head:
                    conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/%d\r\n"
                                 b"Content-Length: 1\r\n\r\nx" % SIZE)  # fmt: skip
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
                try:
                    while not self._stop.wait(self.interval_s):
                        conn.sendall(b"t")
                        self.bytes_sent += 1
                except OSError:
                    continue  # the client shut the connection down

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(5)


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    yield server
    server.close()


def test_a_trickling_origin_fails_the_piece_within_the_piece_timeout(trickler: Trickler) -> None:
    st = stat(trickler.url, {}, timeout_s=5)
    started = time.monotonic()
    with pytest.raises(SourceError) as info:
        read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(64 * KiB), on_piece=lambda *_: None,
                    should_stop=lambda: False, timeout_s=30, piece_timeout_s=0.5)  # fmt: skip
    elapsed = time.monotonic() - started
    assert trickler.bytes_sent > 5  # the bytes kept coming: no read timed out
    assert 0.5 <= elapsed < 5
    message = str(info.value)
    assert message.startswith("the origin sent piece 0 (65536 bytes) too slowly: not within")
    assert "download.piece_timeout_s (0.5 s)" in message
    assert trickler.url in message
    assert info.value.status_code == 0


def test_a_stop_ends_a_read_blocked_on_a_trickle_at_once(trickler: Trickler) -> None:
    trickler.interval_s = 5.0  # each socket read blocks ~5 s: only the watchdog can end it sooner
    st = stat(trickler.url, {}, timeout_s=5)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    delivered = read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(64 * KiB),
                            on_piece=lambda *_: None, should_stop=stop.is_set, timeout_s=30,
                            piece_timeout_s=60)  # fmt: skip
    assert delivered == 0
    assert time.monotonic() - started < 0.3 + STOP_POLL_S + 1.0


def test_a_slow_origin_whose_pieces_arrive_in_time_is_read_to_the_end(tmp_path: Path) -> None:
    piece = 64 * KiB  # the paced origin's send size: one piece every 0.5 s at 128 KiB/s
    data = pseudo_random_bytes(6 * piece)
    with Origin(tmp_path, rate_limit_bytes_per_s=2 * piece) as origin:
        st = stat(origin.add_bytes("slow.bin", data), {}, timeout_s=5)
        crcs: dict[int, int] = {}
        started = time.monotonic()
        read_pieces(st, {}, piece_length=piece, buffer=bytearray(piece),
                    on_piece=lambda n, v, c: crcs.__setitem__(n, c), should_stop=lambda: False,
                    timeout_s=30, piece_timeout_s=1.5)  # fmt: skip
        elapsed = time.monotonic() - started
    assert crcs == {n: zlib.crc32(data[n * piece : (n + 1) * piece]) for n in range(6)}
    assert elapsed > 1.5  # the whole took longer than one piece may


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), ["origin"])


def test_an_https_origin_stalling_mid_piece_fails_the_piece(tmp_path: Path, pki: dict[str, Path]) -> None:
    """The reader is blocked inside a TLS read when the deadline passes; the next piece never comes."""
    cert, key, ca = pki["origin"], pki["origin.key"], str(pki["ca"])
    data = pseudo_random_bytes(2 * 256 * KiB)
    # 64 KiB sent at a time, 4 s apart: the first piece's second chunk comes long after its deadline
    with Origin(tmp_path, certfile=cert, keyfile=key, rate_limit_bytes_per_s=16 * KiB) as origin:
        st = stat(origin.add_bytes("stall.bin", data), {}, timeout_s=5, ca_file=ca)
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"the origin sent piece 0 \(262144 bytes\) too slowly"):
            read_pieces(st, {}, piece_length=256 * KiB, buffer=bytearray(256 * KiB), on_piece=lambda *_: None,
                        should_stop=lambda: False, timeout_s=30, piece_timeout_s=0.5,
                        ca_file=ca)  # fmt: skip
        assert time.monotonic() - started < 3.5


def test_the_watchdog_shuts_the_read_only_while_it_runs() -> None:
    """An expired deadline calls `shut` once (with `expired` set); a closed watchdog calls nothing."""
    shut = threading.Event()
    deadline = PieceDeadline(shut.set, 0.05, lambda: False)
    deadline.arm()
    assert shut.wait(5)
    assert deadline.expired
    deadline.close()
    quiet = threading.Event()
    idle = PieceDeadline(quiet.set, 0.05, lambda: False)
    idle.close()
    idle.close()  # idempotent
    idle.arm()  # after close: no thread left to act on it
    assert not quiet.wait(0.2)
    with pytest.raises(ValueError, match="piece_timeout_s must be > 0"):
        PieceDeadline(lambda: None, 0, lambda: False)
