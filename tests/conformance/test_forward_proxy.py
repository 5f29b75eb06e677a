"""curl and wget through the dfdaemon's forward proxy (port 4001, `http_proxy=` / `curl -x`).

Real processes: the dfly test origin on 127.0.0.1, a scheduler, a seed and two peers whose
`proxy.allowed_hosts` is that origin and whose `proxy.rules` match `.bin` files. Checks: a matching GET
goes through P2P (`X-Dragonfly-Task-ID`, right bytes) and the second host's download costs the origin no
more bytes; `Range` is served from the pieces (206); a non-matching GET is forwarded directly (the
origin sees curl); `X-Dragonfly-Use-P2P: true` sends one through P2P anyway; a host that is not allowed
gets 403 and no connection is made; the daemons' Prometheus proxy counters say the same.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_metrics import proxy_counts

from dfly.cluster import LocalCluster
from dfly.daemon.task_request import TaskRequest
from dfly.devtools.origin import Origin, make_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("wget") is None or shutil.which("curl") is None, reason="needs curl and wget"
    ),
]
MiB = 1 << 20


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www") as server:
        yield server


def curl(proxy: int, url: str, out: Path, *extra: str) -> dict[str, str]:
    """curl through the proxy; returns the response headers (lower-case names) with ':status'."""
    head = out.with_suffix(".headers")
    argv = ["curl", "-s", "-x", f"http://127.0.0.1:{proxy}", "-D", str(head), "-o", str(out), *extra, url]
    subprocess.run(argv, check=True, timeout=60)
    lines = head.read_text().splitlines()
    headers = {":status": lines[0].split()[1]}
    headers.update(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)
    )
    return headers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_curl_and_wget_through_the_forward_proxy(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "model.bin", 8 * MiB, seed=51)
    make_file(origin.root / "notes.txt", 64 * 1024, seed=52)
    proxy = {"proxy": {"allowed_hosts": [origin.base_url], "rules": [r"\.bin$"]}}
    overrides = {"*": proxy}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        first, second = (peer.ports["proxy"] for peer in cluster.peers)
        headers = curl(first, origin.url("/model.bin"), tmp_path / "a.bin")
        assert headers[":status"] == "200"
        assert headers["x-dragonfly-task-id"]
        assert sha(tmp_path / "a.bin") == digest
        sent = origin.bytes_sent
        env = {**os.environ, "http_proxy": f"http://127.0.0.1:{second}", "no_proxy": ""}
        subprocess.run(
            ["wget", "-q", "-O", str(tmp_path / "b.bin"), origin.url("/model.bin")],
            env=env,
            check=True,
            timeout=60,
        )
        assert sha(tmp_path / "b.bin") == digest
        assert origin.bytes_sent == sent  # the second host got it from the swarm

        headers = curl(second, origin.url("/model.bin"), tmp_path / "part", "-r", "1000-1999")
        assert headers[":status"] == "206"
        assert headers["content-range"] == f"bytes 1000-1999/{8 * MiB}"
        assert (tmp_path / "part").read_bytes() == (tmp_path / "a.bin").read_bytes()[1000:2000]

        headers = curl(first, origin.url("/notes.txt"), tmp_path / "notes", "-H", "X-Dragonfly-Tag: t")
        assert "x-dragonfly-task-id" not in headers  # forwarded directly
        assert origin.request_log()[-1].headers.get("User-Agent", "").startswith("curl/")
        assert "X-Dragonfly-Tag" not in origin.request_log()[-1].headers  # the proxy's header stays here
        headers = curl(
            first, origin.url("/notes.txt"), tmp_path / "notes2", "-H", "X-Dragonfly-Use-P2P: true"
        )
        assert headers["x-dragonfly-task-id"]
        assert (tmp_path / "notes2").read_bytes() == (tmp_path / "notes").read_bytes()

        requests = len(origin.request_log())
        headers = curl(first, f"http://127.0.0.2:{origin.port}/model.bin", tmp_path / "no")
        assert headers[":status"] == "403"
        assert headers["x-dragonfly-error-type"] == "forbidden"
        assert len(origin.request_log()) == requests

        # Prometheus: peer-1 answered 4 (2 through P2P, 1 refused), peer-2 2 (both through P2P)
        one, two = (proxy_counts(peer) for peer in cluster.peers)
        assert (one[("requests", "forward")], one[("requests_via_p2p", "forward")]) == (4, 2)
        assert (one[("request_failures", "forward")], one[("requests", "mirror")]) == (1, 0)
        assert (two[("requests", "forward")], two[("requests_via_p2p", "forward")]) == (2, 2)
        assert two[("request_failures", "forward")] == 0


def test_forward_proxy_with_basic_auth(origin: Origin, tmp_path: Path) -> None:
    """With proxy.basic_auth_* set, a request without the right Proxy-Authorization gets 407 and reaches
    nothing; with it, the download works; the password appears in no log."""
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "model.bin", 1 * MiB, seed=53)
    secret = "s3cret-proxy-password"
    proxy = {"proxy": {"allowed_hosts": [origin.base_url], "rules": [r"\.bin$"],
                       "basic_auth_username": "ops", "basic_auth_password": secret}}  # fmt: skip
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"peer-1": proxy}) as cluster:
        port = cluster.peers[0].ports["proxy"]
        headers = curl(port, origin.url("/model.bin"), tmp_path / "no")
        assert headers[":status"] == "407"
        assert headers["proxy-authenticate"].startswith("Basic")
        headers = curl(port, origin.url("/model.bin"), tmp_path / "wrong", "--proxy-user", "ops:guess")
        assert headers[":status"] == "407"
        assert origin.requests == 0
        headers = curl(port, origin.url("/model.bin"), tmp_path / "yes", "--proxy-user", f"ops:{secret}")
        assert headers[":status"] == "200"
        assert sha(tmp_path / "yes") == digest
        token = base64.b64encode(f"ops:{secret}".encode()).decode()
        lower = ("-H", f"Proxy-Authorization: basic {token}")  # the scheme is case-insensitive
        assert curl(port, origin.url("/model.bin"), tmp_path / "lower", *lower)[":status"] == "200"
        logs = "".join(m.log_path.read_text() for m in cluster.members)
    assert secret not in logs


def test_presigned_urls_of_one_object_are_one_task(origin: Origin, tmp_path: Path) -> None:
    """Two hosts fetch one object through URLs signed differently (S3-style `X-Amz-*` parameters, as
    presigned storage and hub CDN links are): the signing parameters are not part of the task, so it
    is one task, read once from the origin; another query parameter still makes another task, unless
    the client names it in `X-Dragonfly-Filtered-Query-Params`; `X-Dragonfly-Tag`,
    `X-Dragonfly-Application` and `X-Dragonfly-Piece-Length` make their own task."""
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "weights.bin", 4 * MiB, seed=54)
    proxy = {"proxy": {"allowed_hosts": [origin.base_url], "rules": [r"\.bin"]}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides={"*": proxy}) as cluster:
        first, second = (peer.ports["proxy"] for peer in cluster.peers)

        def signed(signature: str, version: str = "1") -> str:
            query = f"v={version}&X-Amz-Date=2026112{len(signature)}T000000Z&X-Amz-Signature={signature}"
            return origin.url(f"/weights.bin?{query}")

        a = curl(first, signed("aaaa"), tmp_path / "a.bin")
        b = curl(second, signed("bbbbbbbb"), tmp_path / "b.bin")
        assert sha(tmp_path / "a.bin") == sha(tmp_path / "b.bin") == digest
        assert a["x-dragonfly-task-id"] == b["x-dragonfly-task-id"]
        full_reads = [
            r for r in origin.request_log() if r.method == "GET" and r.headers.get("Range") != "bytes=0-0"
        ]
        assert len(full_reads) == 1  # the seed's, for both hosts
        c = curl(second, signed("cccc", version="2"), tmp_path / "c.bin")
        assert c["x-dragonfly-task-id"] != a["x-dragonfly-task-id"]
        # X-Dragonfly-Filtered-Query-Params adds names to the defaults: `v` no longer makes another task
        extra = ("-H", "X-Dragonfly-Filtered-Query-Params: v, other")
        d = curl(first, signed("dddd", version="3"), tmp_path / "d.bin", *extra)
        e = curl(second, signed("eeee", version="4"), tmp_path / "e.bin", *extra)
        assert d["x-dragonfly-task-id"] == e["x-dragonfly-task-id"] != a["x-dragonfly-task-id"]
        assert sha(tmp_path / "e.bin") == digest
        # X-Dragonfly-Tag / -Application are part of the task, as dfget's --tag / --application
        tagged = ("-H", "X-Dragonfly-Tag: team-a", "-H", "X-Dragonfly-Application: trainer")
        f = curl(first, signed("ffff"), tmp_path / "f.bin", *tagged)
        g = curl(second, signed("gggg"), tmp_path / "g.bin", *tagged)
        assert f["x-dragonfly-task-id"] == g["x-dragonfly-task-id"] != a["x-dragonfly-task-id"]
        assert sha(tmp_path / "g.bin") == digest
        # X-Dragonfly-Piece-Length fixes the piece length and is part of the task, as dfget's --piece-length
        h = curl(first, signed("hhhh"), tmp_path / "h.bin", "-H", "X-Dragonfly-Piece-Length: 1MiB")
        assert h["x-dragonfly-task-id"] == TaskRequest(url=signed("hhhh"), piece_length=MiB).task_id
        assert h["x-dragonfly-task-id"] != a["x-dragonfly-task-id"]
        assert sha(tmp_path / "h.bin") == digest
        bad = curl(first, signed("iiii"), tmp_path / "i.txt", "-H", "X-Dragonfly-Piece-Length: 3MiB")
        assert bad[":status"] == "400"
        assert bad["x-dragonfly-error-type"] == "bad_request"
        assert "X-Dragonfly-Piece-Length" in (tmp_path / "i.txt").read_text()
        sent = [
            r for r in origin.request_log() if any(k.lower().startswith("x-dragonfly") for k in r.headers)
        ]
        assert not sent  # the proxy's own headers never reach the origin


def test_validators_preconditions_and_a_failure_before_the_first_byte(origin: Origin, tmp_path: Path) -> None:
    """Through P2P, the origin's ETag / Last-Modified / Content-Type come back; `If-None-Match` and
    `If-Modified-Since` get 304; `If-Range` naming another object gets the whole object (200), never a
    range of this one spliced onto the client's old bytes. An origin whose ETag changes per response
    (load-balanced backends) cannot be a P2P task: the download fails after it started, before any byte
    went out, and the client gets the object fetched directly, not a 200 cut short."""
    data = os.urandom(3 * MiB + 123)
    url = origin.add_bytes("data.bin", data)
    rotating = origin.add_bytes("rotating.bin", data)
    origin.rotate_etag("rotating.bin")
    proxy = {"proxy": {"allowed_hosts": [origin.base_url], "rules": [r"\.bin$"]}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"peer-1": proxy}) as cluster:
        port = cluster.peers[0].ports["proxy"]
        direct = subprocess.run(
            ["curl", "-s", "-D", "-", "-o", "/dev/null", url], capture_output=True, text=True
        )
        origin_headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in direct.stdout.splitlines()[1:] if ":" in line)
        }
        etag, modified = origin_headers["etag"], origin_headers["last-modified"]

        headers = curl(port, url, tmp_path / "whole")
        assert headers[":status"] == "200"
        assert headers["x-dragonfly-task-id"]
        assert (headers["etag"], headers["last-modified"]) == (etag, modified)
        assert headers["content-type"] == origin_headers["content-type"]
        assert (tmp_path / "whole").read_bytes() == data

        assert curl(port, url, tmp_path / "inm", "-H", f"If-None-Match: {etag}")[":status"] == "304"
        assert not (tmp_path / "inm").exists()  # no body: curl wrote no file
        assert curl(port, url, tmp_path / "ims", "-H", f"If-Modified-Since: {modified}")[":status"] == "304"
        assert curl(port, url, tmp_path / "other", "-H", 'If-None-Match: "other"')[":status"] == "200"

        current = curl(port, url, tmp_path / "current", "-r", "100-199", "-H", f"If-Range: {etag}")
        assert current[":status"] == "206"
        assert (tmp_path / "current").read_bytes() == data[100:200]
        for stale in ('"an-older-object"', "Thu, 01 Jan 1970 00:00:00 GMT", f"W/{etag}"):
            headers = curl(port, url, tmp_path / "stale", "-r", "100-199", "-H", f"If-Range: {stale}")
            assert headers[":status"] == "200", stale
            assert (tmp_path / "stale").read_bytes() == data

        headers = curl(port, rotating, tmp_path / "rotating")  # curl fails on a body cut short
        assert headers[":status"] == "200"
        assert "x-dragonfly-task-id" not in headers  # fetched directly
        assert (tmp_path / "rotating").read_bytes() == data
        assert "not through P2P (origin object changed since stat" in cluster.peers[0].log_path.read_text()
