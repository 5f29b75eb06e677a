"""Odd client input to the mirror is a clear answer, never a 500 with a traceback: numbers of thousands
of digits (Python's int() refuses more than 4,300) and a proxy credential that is not UTF-8.

The real mirror in process, with a swarm that holds the blob and an origin as the (public) registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.daemon.proxy.server import RegistryMirror
from dfly.devtools.origin import Origin
from dfly.devtools.scripted_swarm import ScriptedSwarm, ask_mirror

pytestmark = pytest.mark.timeout(30)

BLOB = b"layer bytes " * 500
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HUGE = "9" * 5000


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "registry") as running:
        yield running


def _ask(
    registry: Origin, swarm: ScriptedSwarm, head: bytes, basic_auth: tuple[str, str] | None = None
) -> tuple[int, bytes]:
    """Send one request head to a mirror of the (public) registry; (status, body) back."""
    up = registry.base_url
    return ask_mirror(
        lambda: RegistryMirror(swarm, up, [up], basic_auth=basic_auth, public_registries=[up]), head
    )


def _blob_get(extra: str) -> bytes:
    return f"GET /v2/lib/x/blobs/{DIGEST} HTTP/1.1\r\nHost: m\r\n{extra}Connection: close\r\n\r\n".encode()


def test_a_range_of_thousands_of_digits_is_the_whole_blob_or_a_416(
    registry: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    swarm = ScriptedSwarm.holding(tmp_path / "a", BLOB, len(BLOB))
    status, body = _ask(registry, swarm, _blob_get(f"Range: bytes=0-{HUGE}\r\n"))
    assert (status, body) == (206, BLOB)  # to the end
    swarm = ScriptedSwarm.holding(tmp_path / "b", BLOB, len(BLOB))
    status, _ = _ask(registry, swarm, _blob_get(f"Range: bytes={HUGE}-\r\n"))
    assert status == 416
    assert "Traceback" not in caplog.text


def test_a_piece_length_of_thousands_of_digits_is_a_400(
    registry: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    swarm = ScriptedSwarm.holding(tmp_path / "a", BLOB, len(BLOB))
    status, body = _ask(registry, swarm, _blob_get(f"X-Dragonfly-Piece-Length: {HUGE}\r\n"))
    assert status == 400
    assert b"invalid size" in body
    assert len(body) < 300
    assert "Traceback" not in caplog.text


def test_a_proxy_credential_that_is_not_utf8_is_a_407(registry: Origin, tmp_path: Path) -> None:
    swarm = ScriptedSwarm.holding(tmp_path / "a", BLOB, len(BLOB))
    url = registry.url("f.bin")
    head = (
        f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        + b"Proxy-Authorization: Basic \xff\xfe\r\n\r\n"
    )
    status, _ = _ask(registry, swarm, head, ("user", "secret"))
    assert status == 407
