"""What a proxied message's headers lose on the way (proxy/http_edge.py): hop-by-hop ones, fixed and
named in its own Connection header, and our X-Dragonfly-* ones; repeated headers keep every value."""

from __future__ import annotations

from dfly.daemon.proxy.http_edge import forwarded_headers, hop_by_hop


def test_headers_named_in_connection_are_hop_by_hop() -> None:
    headers = [("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Accept", "a")]
    assert {"connection", "keep-alive", "x-secret-hop", "transfer-encoding"} <= hop_by_hop(headers)
    assert "accept" not in hop_by_hop(headers)


def test_forwarded_headers_drop_hop_by_hop_and_ours_and_keep_repeats() -> None:
    headers = [
        ("Connection", "X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Dragonfly-Tag", "t"),
        ("Accept", "application/vnd.oci.image.manifest.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Authorization", "Bearer t"),
    ]
    out = forwarded_headers(headers)
    assert out.getall("Accept") == [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
    assert out["Authorization"] == "Bearer t"
    assert set(out) == {"Accept", "Authorization"}
