"""Request-header stripping and the response-header allow-list of the back-to-source HTTP client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.daemon.source.http import (
    ALLOWED_RESPONSE_HEADERS,
    SourceStat,
    read_pieces,
    same_object,
    sanitize_request_headers,
    stat,
)
from dfly.devtools.origin import Origin, pseudo_random_bytes


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path) as server:
        yield server


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("Range", False),
        ("range", False),
        ("If-Range", False),
        ("If-None-Match", False),
        ("If-Modified-Since", False),
        ("If-Match", False),
        ("If-Unmodified-Since", False),
        ("Host", False),
        ("Connection", False),
        ("Keep-Alive", False),
        ("Proxy-Authorization", False),
        ("Proxy-Connection", False),
        ("TE", False),
        ("Trailer", False),
        ("Transfer-Encoding", False),
        ("Upgrade", False),
        ("Content-Length", False),
        ("Authorization", True),
        ("Cookie", True),
        ("User-Agent", True),
        ("X-Dragonfly-Tag", True),
        ("Accept", True),
    ],
)
def test_sanitize_keeps_or_drops(name: str, kept: bool) -> None:
    out = sanitize_request_headers({name: "v"})
    assert (name in out) is kept
    assert out["Accept-Encoding"] == "identity"


def test_sanitize_replaces_accept_encoding_and_drops_headers_named_by_connection() -> None:
    out = sanitize_request_headers(
        {"Accept-Encoding": "gzip, br", "Connection": "close, X-Hop", "X-Hop": "1", "X-End": "2"}
    )
    assert out == {"X-End": "2", "Accept-Encoding": "identity"}


def test_origin_sees_sanitized_headers(origin: Origin) -> None:
    url = origin.add_bytes("obj", pseudo_random_bytes(1000))
    client_headers = {
        "Range": "bytes=10-20",
        "If-None-Match": '"x"',
        "Accept-Encoding": "gzip",
        "Authorization": "Bearer t",
        "X-Custom": "yes",
        "Connection": "keep-alive",
    }
    st = stat(url, client_headers, timeout_s=5)
    buf = bytearray(1024)
    read_pieces(st, client_headers, piece_length=1024, buffer=buf, on_piece=lambda *_: None,
                should_stop=lambda: False, timeout_s=5)  # fmt: skip
    stat_req, body_req = origin.request_log()
    for record in (stat_req, body_req):
        assert record.headers["Accept-Encoding"] == "identity"
        assert record.headers["Authorization"] == "Bearer t"
        assert record.headers["X-Custom"] == "yes"
        assert "If-None-Match" not in record.headers
    assert stat_req.headers["Range"] == "bytes=0-0"
    assert "If-Range" not in stat_req.headers
    assert body_req.headers["Range"] == "bytes=0-999"
    assert body_req.headers["If-Range"] == st.etag


def test_stat_keeps_only_allow_listed_headers(origin: Origin) -> None:
    extra = {"Cache-Control": "max-age=60", "Docker-Content-Digest": "sha256:ab", "X-Secret": "s",
             "Set-Cookie": "a=b", "Content-Type": "application/x-test"}  # fmt: skip
    url = origin.add_bytes("obj", b"x" * 5000, headers=extra)
    st = stat(url, {}, timeout_s=5)
    assert set(st.headers) <= set(ALLOWED_RESPONSE_HEADERS)
    assert st.headers["Cache-Control"] == "max-age=60"
    assert st.headers["Docker-Content-Digest"] == "sha256:ab"
    assert st.headers["Content-Type"] == "application/x-test"
    assert st.headers["Content-Length"] == "5000"  # the total, not the 1 byte of the Range 0-0 answer
    assert st.headers["ETag"] == st.etag
    assert st.etag
    assert st.headers["Last-Modified"] == st.last_modified
    assert st.last_modified
    assert st.content_length == 5000
    assert st.accept_ranges


@pytest.mark.parametrize(
    ("known", "etag", "last_modified", "same"),
    [
        ({"ETag": '"a"'}, '"a"', "", True),
        ({"etag": 'W/"a"'}, '"a"', "", True),  # compared weakly, header names case-insensitive
        ({"ETag": '"a"'}, '"b"', "", False),
        ({"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"}, "", "Tue, 02 Jan 2024 00:00:00 GMT", False),
        ({"ETag": '"a"', "Last-Modified": "x"}, '"a"', "y", True),  # the ETag decides when both have one
        ({}, '"b"', "y", True),  # nothing recorded: nothing to compare
    ],
)
def test_same_object_compares_recorded_validators(
    known: dict[str, str], etag: str, last_modified: str, same: bool
) -> None:
    stat = SourceStat(url="http://h/f", content_length=1, etag=etag, last_modified=last_modified)
    assert same_object(known, stat) is same
