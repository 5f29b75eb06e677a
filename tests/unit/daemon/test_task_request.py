"""TaskRequest refuses what no download can be made from, whoever built it (local API, proxy, seed)."""

from __future__ import annotations

from typing import Any

import pytest

from dfly.common.errors import UsageError
from dfly.daemon.task_request import TaskRequest

URL = "http://origin.example/f.bin"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"url": "http://origin.example/\ud800"}, "url is not valid UTF-8"),
        ({"url": "http://127.0.0.1\x00/x"}, "control character"),
        ({"url": "http://origin.example/a b"}, "space"),
        ({"tag": "\udcff\udcfe"}, "tag is not valid UTF-8"),  # a proxy header's undecodable bytes
        ({"application": "\udcff"}, "application is not valid UTF-8"),
        ({"filtered_query_params": ("\ud800",)}, "filtered query parameter"),
        ({"headers": {"a b:": "x"}}, "invalid header name"),
        ({"headers": {"": "x"}}, "invalid header name"),
        ({"headers": {"X-A": "b\r\nX-Injected: y"}}, "line break or NUL"),
        ({"headers": {"X-A": "\x00"}}, "line break or NUL"),
        ({"headers": {"Authorization": "Basic \udcff"}}, "header Authorization is not valid UTF-8"),
        (
            {"headers": {"X-Name": "中文"}},
            "not ISO-8859-1",
        ),  # dfget -H 'X-Name: 中文' crashed the origin read
    ],
)
def test_a_request_no_download_comes_from_is_a_usage_error(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        TaskRequest(**{"url": URL, **fields})


def test_a_good_request_keeps_its_fields() -> None:
    request = TaskRequest(URL, tag="t", headers={"Range": "bytes=0-1", "X-Token": "é"})
    assert request.to_proto().request_headers["X-Token"] == "é"
    assert len(request.task_id) == 64
