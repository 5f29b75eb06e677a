"""The P2P response's representation headers and the client's preconditions (proxy/representation.py)."""

from __future__ import annotations

import pytest

from dfly.daemon.proxy.representation import MAX_VALUE, not_modified, origin_headers, range_applies

ETAG = '"abc-1"'
MODIFIED = "Sun, 29 Nov 2026 08:07:17 GMT"
ORIGIN = {"ETag": ETAG, "Last-Modified": MODIFIED, "Content-Type": "text/csv", "Cache-Control": "max-age=60"}


def test_the_origins_headers_are_kept_and_others_dropped() -> None:
    recorded = {"etag": ETAG, "last-modified": MODIFIED, "Content-Length": "5", "Docker-Content-Digest": "x"}
    assert origin_headers(recorded) == {
        "ETag": ETAG,
        "Last-Modified": MODIFIED,
        "Content-Type": "application/octet-stream",  # the origin sent none
    }
    assert origin_headers(ORIGIN) == ORIGIN


@pytest.mark.parametrize("bad", ["a\r\nSet-Cookie: x=1", "caf\u00e9", "\x1b[31m", "x" * (MAX_VALUE + 1)])
def test_values_that_came_through_peers_are_checked(bad: str) -> None:
    assert origin_headers({"ETag": bad, "Content-Type": bad}) == {"Content-Type": "application/octet-stream"}


@pytest.mark.parametrize(
    ("request_headers", "expected"),
    [
        ({}, False),
        ({"If-None-Match": ETAG}, True),
        ({"If-None-Match": f'"other", {ETAG}'}, True),
        ({"If-None-Match": f"W/{ETAG}"}, True),  # weak comparison
        ({"If-None-Match": "*"}, True),
        ({"If-None-Match": '"other"'}, False),
        ({"If-None-Match": "not a tag"}, False),
        ({"If-None-Match": '"other"', "If-Modified-Since": MODIFIED}, False),  # If-None-Match decides
        ({"If-Modified-Since": MODIFIED}, True),
        ({"If-Modified-Since": "Mon, 30 Nov 2026 00:00:00 GMT"}, True),
        ({"If-Modified-Since": "Sat, 28 Nov 2026 00:00:00 GMT"}, False),
        ({"If-Modified-Since": "yesterday"}, False),
    ],
)
def test_not_modified(request_headers: dict[str, str], expected: bool) -> None:
    assert not_modified(request_headers, ORIGIN) is expected


def test_without_validators_nothing_is_current() -> None:
    bare = origin_headers({})
    assert not not_modified({"If-None-Match": ETAG}, bare)
    assert not not_modified({"If-Modified-Since": MODIFIED}, bare)
    assert not_modified({"If-None-Match": "*"}, bare)


@pytest.mark.parametrize(
    ("if_range", "origin", "applies"),
    [
        (None, ORIGIN, True),
        (ETAG, ORIGIN, True),
        (MODIFIED, ORIGIN, True),
        ('"older"', ORIGIN, False),
        (f"W/{ETAG}", ORIGIN, False),  # strong comparison: a weak tag never matches
        (ETAG, {**ORIGIN, "ETag": f"W/{ETAG}"}, False),
        ("Thu, 01 Jan 1970 00:00:00 GMT", ORIGIN, False),
        (ETAG, {}, False),  # nothing to compare with: the whole object
        (MODIFIED, {}, False),
        ("garbage", ORIGIN, False),
    ],
)
def test_if_range(if_range: str | None, origin: dict[str, str], applies: bool) -> None:
    request = {} if if_range is None else {"If-Range": if_range}
    assert range_applies(request, origin) is applies
