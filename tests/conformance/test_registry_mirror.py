"""skopeo pulls an image from a real registry through the dfdaemon registry mirror (port 4001).

Real processes: Debian's docker-registry on 127.0.0.1 holding a 2-layer image pushed with skopeo; a
scheduler, a seed and two peers whose `proxy.registry_mirror` is that registry. skopeo (registries.conf
mirror = peer-1's proxy port) copies the image to a `dir:`; then the same through peer-2. Checks: every
blob's bytes have their digest; the registry's access log shows no blob GET from skopeo (the bytes came
through the mirror) and exactly one GET per blob in all (the seed's; peer-2's pull made none).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_metrics import proxy_counts
from registry_kit import MISSING, Registry, pulled_blobs, push_image, registries_conf
from token_server import TokenServer

from dfly.cluster import LocalCluster
from dfly.daemon.proxy.blob import CHUNK_BYTES
from dfly.devtools.origin import Origin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (bash .ci/run installs them)"
    ),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as running:
        yield running


def skopeo_pull(conf: Path, reference: str, out: Path) -> None:
    argv = ["skopeo", "--insecure-policy", "--registries-conf", str(conf), "copy", f"docker://{reference}"]
    done = subprocess.run([*argv, f"dir:{out}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def skopeo_pull_with_credentials(
    tmp_path: Path, registry: Registry, mirror_port: int, reference: str, digests: list[str], secret: str
) -> list[tuple[str, str, int]]:
    """skopeo pulls through the mirror as alice (containers/image takes a mirror's credentials from the
    auth file, by the mirror's own address); every blob is checked and none came from the registry to
    skopeo. Returns the registry's blob GETs."""
    conf = registries_conf(tmp_path / "peer.conf", registry, mirror_port)
    basic = base64.b64encode(f"alice:{secret}".encode()).decode()
    auths = {host: {"auth": basic} for host in (registry.host, f"127.0.0.1:{mirror_port}")}
    (tmp_path / "auth.json").write_text(json.dumps({"auths": auths}))
    argv = ["skopeo", "--insecure-policy", "--registries-conf", str(conf), "copy", "--src-authfile",
            str(tmp_path / "auth.json"), f"docker://{reference}", f"dir:{tmp_path / 'pulled'}"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = pulled_blobs(tmp_path / "pulled")
    assert all(got.get(d.removeprefix("sha256:")) == d.removeprefix("sha256:") for d in digests)
    gets = registry.blob_gets()
    assert not [ua for _, ua, _ in gets if "skopeo" in ua], "skopeo fetched a blob from the registry"
    return gets


def test_skopeo_pulls_through_the_mirror_and_the_registry_sends_each_blob_once(
    registry: Registry, tmp_path: Path
) -> None:
    reference, digests = push_image(registry, tmp_path / "image")
    pushed_gets = len(registry.blob_gets())
    public = {"registry_mirror": registry.url, "public_registries": [registry.url]}  # no access check
    overrides = {"*": {"proxy": public}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        for peer in cluster.peers:
            conf = registries_conf(tmp_path / f"{peer.name}.conf", registry, peer.ports["proxy"])
            out = tmp_path / f"pulled-{peer.name}"
            skopeo_pull(conf, reference, out)
            got = pulled_blobs(out)
            for digest in digests:
                hexdigest = digest.removeprefix("sha256:")
                assert got.get(hexdigest) == hexdigest, f"{peer.name}: blob {digest} missing or wrong"
        gets = registry.blob_gets()[pushed_gets:]
        assert not [ua for _, ua, _ in gets if "skopeo" in ua], (
            "skopeo fetched a blob from the registry itself"
        )
        copies = Counter(digest for digest, _, size in gets if size > 1)  # the source's 1-byte stat aside
        assert copies == Counter(digests), gets  # each blob sent once in all, to the seed
        # a public registry: the mirror asks it nothing before serving from the swarm
        assert registry.mirror_heads() == []
        assert all(m.alive() for m in cluster.members)


def test_hosts_pulling_at_once_get_each_blob_from_the_registry_once(
    registry: Registry, tmp_path: Path
) -> None:
    """A rollout: three hosts pull the same new image at the same moment, each through its own daemon
    (skopeo, concurrently). Every blob is right on every host and the registry sends each blob once."""
    reference, digests = push_image(registry, tmp_path / "image", layers=3, layer_bytes=6 << 20)
    pushed_gets = len(registry.blob_gets())
    overrides = {"*": {"proxy": {"registry_mirror": registry.url, "public_registries": [registry.url]}}}
    with LocalCluster(tmp_path / "c", peers=3, daemon_overrides=overrides) as cluster:
        pulls: list[subprocess.Popen[str]] = []
        try:
            for peer in cluster.peers:
                conf = registries_conf(tmp_path / f"{peer.name}.conf", registry, peer.ports["proxy"])
                argv = ["skopeo", "--insecure-policy", "--registries-conf", str(conf), "copy",
                        f"docker://{reference}", f"dir:{tmp_path / peer.name}"]  # fmt: skip
                pulls.append(subprocess.Popen(argv, stderr=subprocess.PIPE, text=True))
            for pull in pulls:
                _, stderr = pull.communicate(timeout=120)
                assert pull.returncode == 0, stderr
        finally:  # a failed or hung pull leaves no skopeo running
            for pull in pulls:
                if pull.poll() is None:
                    pull.kill()
                    pull.communicate()
        for peer in cluster.peers:
            got = pulled_blobs(tmp_path / peer.name)
            assert all(got.get(d.removeprefix("sha256:")) == d.removeprefix("sha256:") for d in digests)
    gets = registry.blob_gets()[pushed_gets:]
    assert not [ua for _, ua, _ in gets if "skopeo" in ua]
    assert Counter(digest for digest, _, size in gets if size > 1) == Counter(digests), gets


def raw_request(port: int, request: bytes) -> tuple[int, str]:
    """(status, X-Dragonfly-Error-Type) of one request sent as raw bytes (urllib cannot send non-ASCII)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the response head"
            head += chunk
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers.get("X-Dragonfly-Error-Type", "")


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_mirror_answers_ping_ranges_and_refuses_what_it_must(registry: Registry, tmp_path: Path) -> None:
    """`/v2/` ping, a blob with and without Range (bytes checked against skopeo's direct copy), a manifest
    passed through with every Accept value, a registry that is not allowed (403, no request made) and a
    path that is not the registry API (400)."""
    reference, digests = push_image(registry, tmp_path / "image", layers=1)
    direct = tmp_path / "direct"
    argv = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        f"docker://{reference}",
        f"dir:{direct}",
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    layer = digests[1]
    data = (direct / layer.removeprefix("sha256:")).read_bytes()
    overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
        mirror = f"http://127.0.0.1:{cluster.peers[0].ports['proxy']}"
        status, headers, body = fetch(f"{mirror}/v2/")
        assert (status, body, headers["Docker-Distribution-Api-Version"]) == (200, b"{}", "registry/2.0")

        blob = f"{mirror}/v2/demo/app/blobs/{layer}"
        status, headers, body = fetch(blob, {"Range": "bytes=1000-"})
        assert status == 206
        assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert body == data[1000:]
        status, headers, _ = fetch(blob, {"Range": f"bytes={len(data)}-"})  # past the end
        assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")
        assert headers["X-Dragonfly-Error-Type"] == "range"
        status, headers, body = fetch(blob)
        assert (status, body) == (200, data)
        assert headers["Docker-Content-Digest"] == layer
        assert headers["X-Dragonfly-Task-ID"]

        accept = "application/vnd.oci.image.manifest.v1+json"
        status, headers, _ = fetch(f"{mirror}/v2/demo/app/manifests/1", {"Accept": accept})
        assert status == 200
        assert headers["Content-Type"] == accept

        before = registry.log_path.read_text()
        status, headers, _ = fetch(blob, {"X-Dragonfly-Registry": "http://169.254.169.254"})
        assert status == 403
        assert headers["X-Dragonfly-Error-Type"] == "forbidden"
        status, _, _ = fetch(f"{mirror}/v2/demo/../../etc/passwd")
        assert status == 400
        assert registry.log_path.read_text() == before  # nothing was asked of the registry
        counts = proxy_counts(cluster.peers[0])  # Prometheus: 7 answered, 2 blobs from P2P, 3 refused (416)
        names = ("requests", "requests_via_p2p", "request_failures")
        assert [counts[(name, "mirror")] for name in names] == [7, 2, 3]

        # Bytes no download can be made from: a clean 4xx, never a 500 and a traceback in the log.
        port = cluster.peers[0].ports["proxy"]
        path = f"/v2/demo/app/blobs/{layer}".encode()
        for header, answer in (
            (b"X-Dragonfly-Tag: \xff\xfe", (400, "bad_request")),
            (b"X-Dragonfly-Registry: http://[", (400, "bad_request")),
            (b"X-Dragonfly-Registry: \xff", (400, "bad_request")),  # not a host name at all
            (b"X-Dragonfly-Registry: other.example", (403, "forbidden")),  # a host that is not allowed
        ):
            got = raw_request(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
            assert got == answer, header
        status, _ = raw_request(
            port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nRange: bytes=\xc2\xb2-\r\n\r\n"
        )
        assert status == 200  # not a byte range: the whole blob
        encoded = f"/v2/demo%2fapp/blobs/{layer}".encode()  # `%2f` would let a name smuggle a slash
        assert raw_request(port, b"GET " + encoded + b" HTTP/1.1\r\nHost: x\r\n\r\n") == (400, "bad_request")
        assert "Traceback" not in cluster.peers[0].log_path.read_text(errors="replace")


def test_a_registry_redirecting_blobs_to_storage_is_followed_by_the_daemon(tmp_path: Path) -> None:
    """The registry answers blob GETs with 307 to a storage server (S3-style). While the storage server
    is not in `proxy.allowed_hosts` the hop is refused: the client gets an error and the storage server
    no request. Once allowed, the client gets 200 and the bytes from the mirror, never the redirect: the
    storage server sees the blobs fetched only by the daemon's origin reader, once each, and nothing
    from skopeo."""
    storage_root = tmp_path / "registry" / "data"
    storage_root.mkdir(parents=True)
    with (
        Origin(storage_root) as storage,
        Registry(tmp_path / "registry", redirect_to=storage.base_url) as registry,
    ):
        reference, digests = push_image(registry, tmp_path / "image")
        proxy: dict[str, object] = {"registry_mirror": registry.url}
        with LocalCluster(tmp_path / "refused", peers=1, daemon_overrides={"*": {"proxy": proxy}}) as cluster:
            port = cluster.peers[0].ports["proxy"]
            url = f"http://127.0.0.1:{port}/v2/demo/app/blobs/{digests[1]}"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=60)
            assert refused.value.code == 502
            assert "is not allowed" in refused.value.read().decode()
        assert storage.requests == 0
        proxy["allowed_hosts"] = [storage.base_url]
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"*": {"proxy": proxy}}) as cluster:
            conf = registries_conf(tmp_path / "peer.conf", registry, cluster.peers[0].ports["proxy"])
            skopeo_pull(conf, reference, tmp_path / "pulled")
        got = pulled_blobs(tmp_path / "pulled")
        assert all(got.get(d.removeprefix("sha256:")) == d.removeprefix("sha256:") for d in digests)
        fetched = [r for r in storage.request_log() if r.method == "GET" and r.path.endswith("/data")]
        assert not [r for r in fetched if "skopeo" in r.headers.get("User-Agent", "")]
        reads = [r for r in fetched if r.headers.get("Range") != "bytes=0-0"]  # the reader's stat aside
        full = Counter(r.path.split("/")[-2] for r in reads)
        assert full == Counter(d.removeprefix("sha256:") for d in digests), fetched
        assert {status for _, _, status in registry.blob_statuses()} == {307}


def test_a_private_registry_through_the_mirror(tmp_path: Path) -> None:
    """A registry that wants credentials (htpasswd: 401 + WWW-Authenticate): skopeo with the right
    credentials pulls through the mirror (the seed reads the registry with them); afterwards, with the
    blobs in the swarm, a client with no or wrong credentials still gets the registry's 401, never the
    bytes; the password is in no log."""
    secret = "reg-pass-7f3a"
    with Registry(tmp_path / "registry", credentials=("alice", secret)) as registry:
        reference, digests = push_image(registry, tmp_path / "image", layers=1)
        overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
            mirror_port = cluster.peers[0].ports["proxy"]
            skopeo_pull_with_credentials(tmp_path, registry, mirror_port, reference, digests, secret)

            blob = f"http://127.0.0.1:{cluster.peers[0].ports['proxy']}/v2/demo/app/blobs/{digests[1]}"
            status, headers, body = fetch(blob)
            assert status == 401
            assert headers["WWW-Authenticate"].startswith("Basic")
            assert (headers["X-Dragonfly-Error-Type"], headers["X-Dragonfly-Origin-Status"]) == (
                "auth",
                "401",
            )
            assert len(body) < 1000  # an error text, not the layer
            wrong = "Basic " + base64.b64encode(b"alice:guess").decode()
            assert fetch(blob, {"Authorization": wrong})[0] == 401
            right = "Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()
            missing = blob.rsplit("/", 1)[0] + "/sha256:" + "0" * 64
            status, headers, _ = fetch(missing, {"Authorization": right})
            assert (status, headers["X-Dragonfly-Error-Type"]) == (404, "not_found")
            status, _, body = fetch(blob, {"Authorization": right})
            assert status == 200
            assert hashlib.sha256(body).hexdigest() == digests[1].removeprefix("sha256:")

            # the same blob through the forward proxy (as inside an intercepted CONNECT): P2P after the
            # same access check, so `Authorization` does not force it to the registry
            direct = f"{registry.url}/v2/demo/app/blobs/{digests[1]}"
            reads = len(registry.blob_gets())
            for auth, expected in ((wrong, "401"), (right, "200")):
                argv = ["curl", "-s", "-x", f"http://127.0.0.1:{mirror_port}", "-H", f"Authorization: {auth}",
                        "-o", str(tmp_path / "fwd"), "-D", "-", direct]  # fmt: skip
                head = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
                assert head.split()[1] == expected, head
            assert "X-Dragonfly-Task-ID" in head
            assert hashlib.sha256((tmp_path / "fwd").read_bytes()).hexdigest() == digests[1].removeprefix(
                "sha256:"
            )
            assert len(registry.blob_gets()) == reads  # served from the swarm
            # a query string leaves the task the same (empty and filtered parameters are not part of
            # it), so it must not skip the access check either
            for query in ("?", "?&", "?X-Amz-Signature=x"):
                argv = ["curl", "-s", "-x", f"http://127.0.0.1:{mirror_port}", "-o", str(tmp_path / "anon"),
                        "-D", "-", direct + query]  # fmt: skip
                head = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
                assert head.split()[1] == "401", (query, head)
            logs = "".join(m.log_path.read_text() for m in cluster.members)
        assert registry.mirror_heads()  # a private registry: each client's credentials were checked upstream
        assert secret not in logs
        assert base64.b64encode(f"alice:{secret}".encode()).decode() not in logs


def test_a_token_auth_registry_through_the_mirror(tmp_path: Path) -> None:
    """A registry with token auth (Docker Hub's flow: 401 + `WWW-Authenticate: Bearer realm=...`, the
    client fetches a JWT from the token server itself and retries): skopeo pulls through the mirror; the
    seed reads the registry with the client's token; afterwards a client with no token gets the Bearer
    challenge and not the bytes, one with a token for its own scope gets the blob; neither password nor
    token is in any log."""
    secret = "token-pass-91c2"
    with (
        TokenServer(tmp_path / "tokens", ("alice", secret)) as tokens,
        Registry(
            tmp_path / "registry", credentials=("alice", secret), token_auth=tokens.registry_config()
        ) as registry,
    ):
        reference, digests = push_image(registry, tmp_path / "image", layers=1)
        overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
            mirror_port = cluster.peers[0].ports["proxy"]
            gets = skopeo_pull_with_credentials(tmp_path, registry, mirror_port, reference, digests, secret)
            assert {d for d, ua, _ in gets if ua == ""} == set(digests)  # the seed's reader sends no UA
            assert ("alice", "repository:demo/app:pull") in tokens.issued

            blob = f"http://127.0.0.1:{mirror_port}/v2/demo/app/blobs/{digests[1]}"
            status, headers, body = fetch(blob)
            assert status == 401
            assert headers["WWW-Authenticate"].startswith(f'Bearer realm="{tokens.url}/token"')
            assert len(body) < 1000
            other = tokens.token("alice", ["repository:other/app:pull"])  # valid, for another repository
            assert fetch(blob, {"Authorization": f"Bearer {other}"})[0] == 401
            token = tokens.token("alice", ["repository:demo/app:pull"])
            status, _, body = fetch(blob, {"Authorization": f"Bearer {token}"})
            assert status == 200
            assert hashlib.sha256(body).hexdigest() == digests[1].removeprefix("sha256:")
            logs = "".join(m.log_path.read_text() for m in cluster.members)
        assert secret not in logs
        assert base64.b64encode(f"alice:{secret}".encode()).decode() not in logs
        assert token not in logs
        assert token.split(".")[2] not in logs


def test_a_client_leaving_mid_blob_is_no_error_and_the_blob_stays_servable(
    registry: Registry, tmp_path: Path
) -> None:
    """curl reads a blob slowly through the mirror and is killed mid-body: the daemon logs no traceback,
    and the next request gets the whole blob."""
    _, digests = push_image(registry, tmp_path / "image", layers=1, layer_bytes=32 << 20)
    overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
        peer = cluster.peers[0]
        blob = f"http://127.0.0.1:{peer.ports['proxy']}/v2/demo/app/blobs/{digests[1]}"
        partial = tmp_path / "partial"
        slow = subprocess.Popen(["curl", "-s", "--limit-rate", "1M", "-o", str(partial), blob])
        try:
            deadline = time.monotonic() + 30
            while not (partial.exists() and partial.stat().st_size > 0):
                assert time.monotonic() < deadline, "no byte reached the slow client"
                time.sleep(0.05)
        finally:
            slow.kill()
            slow.wait()
        status, _, body = fetch(blob)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == digests[1].removeprefix("sha256:")
        assert "Traceback" not in peer.log_path.read_text()
        assert peer.alive()


def test_a_blob_whose_bytes_do_not_match_its_digest_is_never_completed(tmp_path: Path) -> None:
    """An upstream serving other bytes than the digest in the URL (the dfly test origin posing as a
    registry): the mirror sends at most all but the last chunk, then closes the connection, so the
    client sees a short body (curl: exit 18), never a complete wrong blob; the daemon evicts its copy,
    and a second request ends the same way (the bytes are wrong wherever they come from). The blob is
    larger than one chunk (blob.CHUNK_BYTES), so a first chunk is always sent before the check; a blob
    sent as one chunk is answered 502 instead (no byte sent), which a 3 MiB blob got when all its pieces
    were ready at once."""
    assert CHUNK_BYTES < 6 << 20
    good, bad = os.urandom(6 << 20), os.urandom(6 << 20)
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    with Origin(tmp_path / "www") as upstream:
        upstream.add_bytes(f"v2/demo/app/blobs/{digest}", bad)
        proxy = {"proxy": {"registry_mirror": upstream.base_url, "public_registries": [upstream.base_url]}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"*": proxy}) as cluster:
            peer = cluster.peers[0]
            blob = f"http://127.0.0.1:{peer.ports['proxy']}/v2/demo/app/blobs/{digest}"
            for attempt in range(2):
                out = tmp_path / f"out-{attempt}"
                done = subprocess.run(["curl", "-s", "-o", str(out), blob], timeout=60)
                assert done.returncode == 18, done  # "partial file": the body ended before Content-Length
                assert not out.exists() or out.stat().st_size < len(bad)
            log = peer.log_path.read_text()
            assert log.count("does not match the digest") == 2  # evicted after each attempt
            assert "Traceback" not in log


def test_a_wrong_blob_sent_as_one_chunk_is_a_502(tmp_path: Path) -> None:
    """A wrong blob of one piece is one chunk: it is checked before any byte goes out, so the answer is
    a 502 (digest), never a 200 cut short or complete; and it is not kept."""
    good, bad = os.urandom(200 << 10), os.urandom(200 << 10)  # one piece (256 KiB at least)
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    with Origin(tmp_path / "www") as upstream:
        upstream.add_bytes(f"v2/demo/app/blobs/{digest}", bad)
        proxy = {"proxy": {"registry_mirror": upstream.base_url, "public_registries": [upstream.base_url]}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"*": proxy}) as cluster:
            peer = cluster.peers[0]
            for _ in range(2):
                status, headers, body = fetch(
                    f"http://127.0.0.1:{peer.ports['proxy']}/v2/demo/app/blobs/{digest}"
                )
                assert (status, headers["X-Dragonfly-Error-Type"]) == (502, "digest")
                assert bad not in body
            log = peer.log_path.read_text()
            assert log.count("does not match the digest") == 2
            assert "Traceback" not in log


def test_an_empty_blob_is_checked_against_its_digest_too(tmp_path: Path) -> None:
    """A blob of 0 bytes has no last chunk to hold back: its digest is checked before the answer starts,
    so a wrong empty blob is a 502, never a complete 200, and it is not kept."""
    digest = "sha256:" + hashlib.sha256(b"not empty").hexdigest()
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    with Origin(tmp_path / "www") as upstream:
        upstream.add_bytes(f"v2/demo/app/blobs/{digest}", b"")
        upstream.add_bytes(f"v2/demo/app/blobs/{empty}", b"")
        proxy = {"proxy": {"registry_mirror": upstream.base_url, "public_registries": [upstream.base_url]}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"*": proxy}) as cluster:
            peer = cluster.peers[0]
            mirror = f"http://127.0.0.1:{peer.ports['proxy']}/v2/demo/app/blobs/"
            for _ in range(2):  # not kept: the second request ends the same way
                status, headers, body = fetch(mirror + digest)
                assert (status, headers["X-Dragonfly-Error-Type"]) == (502, "digest")
            status, headers, body = fetch(mirror + empty)  # the real empty blob is served
            assert (status, body, headers["Docker-Content-Digest"]) == (200, b"", empty)
            assert "Traceback" not in peer.log_path.read_text()
