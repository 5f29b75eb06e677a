"""Canonical URL and task id rules (DESIGN.md §3), pinned by tables."""

import pytest

from dfly.common.errors import UsageError
from dfly.common.ids import (
    DEFAULT_FILTERED_QUERY_PARAMS,
    canonical_url,
    effective_filters,
    redact_url,
    task_id,
)

CANONICAL = [
    ("HTTP://Example.COM/a/b", "http://example.com/a/b"),
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("https://example.com:8443/a", "https://example.com:8443/a"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com/a#frag", "http://example.com/a"),
    ("http://example.com/A/%7Euser", "http://example.com/A/%7Euser"),
    ("http://example.com/a?b=2&a=1", "http://example.com/a?a=1&b=2"),
    ("http://example.com/a?b=2&a=1&b=1", "http://example.com/a?a=1&b=2&b=1"),
    ("http://example.com/a?X-Amz-Signature=s&X-Amz-Date=d&v=1", "http://example.com/a?v=1"),
    ("http://example.com/a?ns=docker.io", "http://example.com/a"),
    ("http://example.com/a?Expires=1&Signature=x&OSSAccessKeyId=k", "http://example.com/a"),
    ("http://example.com/a?", "http://example.com/a"),
    ("http://[::1]:8080/a", "http://[::1]:8080/a"),
]


@pytest.mark.parametrize(("url", "expected"), CANONICAL)
def test_canonical_url(url: str, expected: str) -> None:
    assert canonical_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a", "example.com/a", "http:///a", "http://h:99999/a", "http://a..b/x",
     "http://" + "a" * 64 + ".com/x"],
)  # fmt: skip
def test_canonical_url_rejects(url: str) -> None:
    with pytest.raises(UsageError):
        canonical_url(url)


def test_user_filters_extend_defaults_and_can_replace_them() -> None:
    filters = effective_filters(["token"])
    assert filters[: len(DEFAULT_FILTERED_QUERY_PARAMS)] == DEFAULT_FILTERED_QUERY_PARAMS
    assert canonical_url("http://h/a?token=1&ns=x&v=2", filters) == "http://h/a?v=2"
    only_user = effective_filters(["token"], no_default_filters=True)
    assert canonical_url("http://h/a?token=1&ns=x", only_user) == "http://h/a?ns=x"


# Inputs that name the same object as dfget sees it; later the proxy and mirror rows join this table.
SAME_TASK = [
    "http://origin.example:80/blobs/sha256:abc?X-Amz-Signature=one&X-Amz-Date=20260101",
    "http://ORIGIN.example/blobs/sha256:abc?X-Amz-Date=20270101&X-Amz-Signature=two",
    "http://origin.example/blobs/sha256:abc#ignored",
    "http://origin.example/blobs/sha256:abc?ns=docker.io",
]


def test_same_object_same_task_id() -> None:
    ids = {task_id(url) for url in SAME_TASK}
    assert len(ids) == 1
    assert len(next(iter(ids))) == 64


def test_tag_application_and_piece_length_split_tasks() -> None:
    base = task_id("http://h/a")
    others = [
        task_id("http://h/a", tag="t"),
        task_id("http://h/a", application="app"),
        task_id("http://h/a", piece_length=1 << 20),
        task_id("http://h/b"),
    ]
    assert len({base, *others}) == 5
    # tag and application are not interchangeable
    assert task_id("http://h/a", tag="x") != task_id("http://h/a", application="x")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@h:8080/a?token=s", "http://h:8080/a?…"),
        ("https://h/a", "https://h/a"),
        ("http://[::1]:80/p?x=s", "http://[::1]:80/p?…"),
        ("http://user:pw@h:99999/x?token=s", "http://h:99999/x?…"),  # invalid port: cut by hand
        ("http://[::1/x?token=s", "http://[::1/x?…"),  # unbalanced bracket
        # what a local API or proxy client chooses is logged: no terminal escapes, NUL or bidi overrides
        ("http://h/\x1b[2J\x1b[31mFAKE", "http://h/\\x1b[2J\\x1b[31mFAKE"),
        ("http://h/a\x00b\u202ec", "http://h/a\\x00b\\u202ec"),
        ("http://h:99999/\x07?t=s", "http://h:99999/\\x07?…"),
        ("http://h/ünïcode päth", "http://h/ünïcode päth"),  # printable text is shown as it is
    ],
)
def test_redact_url_drops_credentials_and_query(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_invalid_url_errors_do_not_repeat_the_query() -> None:
    with pytest.raises(UsageError) as err:
        canonical_url("http://h:99999/x?token=secret")
    assert "secret" not in str(err.value)
