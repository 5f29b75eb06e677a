"""aiohttp's reason for an unparsable request is logged without the request bytes it quotes."""

from __future__ import annotations

import pytest

from dfly.daemon.proxy.http_edge import parse_failure_reason


@pytest.mark.parametrize(
    ("message", "logged"),
    [
        (
            "Got more than 8190 bytes when reading: bytearray(b'http://alice:TopSecretPw@x/')",
            "Got more than 8190 bytes when reading (request bytes not logged)",
        ),
        (
            "Got more than 8190 bytes when reading: b'Basic QWxhZGRpbg=='",
            "Got more than 8190 bytes when reading (request bytes not logged)",
        ),
        (
            "Bad status line 'GET http://u:TopSecretPw@x/ HTTP/9'",
            "Bad status line (request bytes not logged)",
        ),
        ('Bad status line "GET /?t=TopSecretPw\'x HTTP/9".', "Bad status line (request bytes not logged)"),
        ("Invalid header value char:\n\n  b'Cookie: TopSecretPw\\x00'\n  ^", "Invalid header value char"),
        ("Content-Length can't be present with Transfer-Encoding", None),
        ("Duplicate 'Content-Length' header found.", None),
        ("Bad request\x1b[31m", "Bad request\\x1b[31m"),
    ],
)
def test_quoted_request_bytes_are_cut_off(message: str, logged: str | None) -> None:
    assert parse_failure_reason(message) == (message if logged is None else logged)
    assert "TopSecretPw" not in parse_failure_reason(message)
