"""huggingface_hub downloads a model file through the dfdaemon's forward proxy, the file through P2P.

Real processes and the real client: a stand-in Hub on 127.0.0.1 that answers a file's `resolve` URL as
the Hub does for LFS files (302 to a CDN URL signed afresh for every request, `X-Repo-Commit`,
`X-Linked-Etag`, `X-Linked-Size`) and lists the repository (`/api/models/...`), the dfly test origin as
that CDN (`localhost`), a scheduler, a seed and two peers whose `proxy.rules` send the CDN's paths
through P2P. huggingface_hub runs on each peer's proxy in turn: `hf_hub_download` of the file on the
first, `hf download REPO` (the whole repository) on the second, each in a child process with
`HF_ENDPOINT`, `HTTP(S)_PROXY`, `HF_HUB_DISABLE_XET` and its own `HF_HOME`, as docs/registry-mirror.md
tells users to; over plain HTTP, and over HTTPS with the Hub tunnelled and the CDN intercepted
(`proxy.hijack_https`; the client's `SSL_CERT_FILE` holds the Hub's CA and its daemon's proxy CA).
Checks: both copies have the file's sha256; the stand-in Hub answered the client's metadata requests
itself (not P2P); the CDN sent the file once in all (besides the seed's 1-byte probe) although the two
clients were given differently signed links, and never to huggingface_hub itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dfly.cluster import LocalCluster
from dfly.devtools.origin import Origin, pseudo_random_bytes
from dfly.devtools.pki import make_pki

pytestmark = pytest.mark.integration
pytest.importorskip("huggingface_hub", reason="the client is a dev dependency: pip install -e .[dev]")
MiB = 1 << 20
REPO, FILENAME, COMMIT = "dfly-org/tiny-model", "model.safetensors", "a" * 40


class StandInHub:
    """`HEAD|GET /<repo>/resolve/main/<file>` → 302 to `cdn_url` with fresh `X-Amz-*` signing parameters
    and the Hub's metadata headers; anything else 404. `requests` records (method, path, User-Agent)."""

    def __init__(
        self, cdn_url: str, sha256: str, size: int, certfile: Path | None, keyfile: Path | None
    ) -> None:
        self.requests: list[tuple[str, str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer()

            def do_GET(self) -> None:
                self._answer()

            def _answer(self) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("User-Agent", "")))
                path = self.path.partition("?")[0]
                if path in (f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}/tree/{COMMIT}"):
                    self._json(path.endswith("main"))
                    return
                if path not in (f"/{REPO}/resolve/main/{FILENAME}", f"/{REPO}/resolve/{COMMIT}/{FILENAME}"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                signature = f"X-Amz-Signature={secrets.token_hex(32)}&X-Amz-Date=20261129T120000Z"
                self.send_response(302)
                self.send_header("Location", f"{cdn_url}?X-Amz-Expires=3600&{signature}")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(size))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _json(self, info: bool) -> None:
                """The repository's info, or its file tree: what `hf download REPO` lists first."""
                lfs = {"oid": sha256, "size": size, "pointerSize": 134}
                entry = {"type": "file", "oid": "b" * 40, "size": size, "path": FILENAME, "lfs": lfs}
                body = {"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": FILENAME}]} if info else [entry]
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def hf_download(
    hub: str, proxy_port: int, home: Path, ca_bundle: Path | None, *, cli: bool
) -> subprocess.CompletedProcess[str]:
    """The real client in a child process, configured only by the environment, as a user would: its
    `hf download REPO` command (the whole repository; last line `path: <snapshot dir>`) or its Python
    API for the one file (prints the file's path)."""
    code = f"from huggingface_hub import hf_hub_download; print(hf_hub_download({REPO!r}, {FILENAME!r}))"
    argv = (
        [str(Path(sys.executable).parent / "hf"), "download", REPO] if cli else [sys.executable, "-c", code]
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("HF_", "HTTP", "NO_PROXY", "ALL_PROXY", "SSL_CERT"))
    }
    proxy = f"http://127.0.0.1:{proxy_port}"
    env |= {"HF_ENDPOINT": hub, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "HF_HOME": str(home),
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    if ca_bundle is not None:
        env["SSL_CERT_FILE"] = str(ca_bundle)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_huggingface_hub_downloads_a_model_file_through_p2p(
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTPS as docs/registry-mirror.md says: the Hub (127.0.0.1) tunnelled, the CDN (localhost)
    intercepted; the client's SSL_CERT_FILE holds the Hub's CA and its daemon's proxy CA."""
    tls: dict[str, Path] = {}
    if scheme == "https":
        tls = make_pki(tmp_path / "pki", ["origin"])
        monkeypatch.setenv("SSL_CERT_FILE", str(tls["ca"]))  # the daemons' trust, for the CDN
    data = pseudo_random_bytes(12 * MiB, seed=67)
    sha256 = hashlib.sha256(data).hexdigest()
    blob_path = f"/repos/5e/1f/{sha256}"
    with Origin(tmp_path / "www", certfile=tls.get("origin"), keyfile=tls.get("origin.key")) as cdn:
        cdn_base = f"{scheme}://localhost:{cdn.port}"
        cdn.add_bytes(blob_path, data)
        with StandInHub(
            cdn_base + blob_path, sha256, len(data), tls.get("origin"), tls.get("origin.key")
        ) as hub:
            proxy = {
                "proxy": {
                    "allowed_hosts": [hub.url, cdn_base],
                    "rules": ["^" + cdn_base + "/repos/"],
                    "hijack_https": {"hosts": ["^localhost$"]},
                }
            }
            with LocalCluster(tmp_path / "c", peers=2, daemon_overrides={"*": proxy}) as cluster:
                for n, peer in enumerate(cluster.peers):
                    bundle = None
                    if tls:  # the Hub's own CA (a tunnel) and this daemon's (the intercepted CDN)
                        bundle = tmp_path / f"bundle-{n}.pem"
                        bundle.write_bytes(
                            tls["ca"].read_bytes() + (peer.data_dir / "proxy-ca.crt").read_bytes()
                        )
                    home = tmp_path / f"hf-home-{n}"
                    done = hf_download(hub.url, peer.ports["proxy"], home, bundle, cli=n == 1)
                    assert done.returncode == 0, done.stdout + done.stderr
                    path = Path(done.stdout.strip().splitlines()[-1].rpartition("path:")[2].strip())
                    assert path.is_relative_to(home)
                    if path.is_dir():  # `hf download REPO` prints the snapshot's directory
                        path = path / FILENAME
                    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        metadata = [r for r in hub.requests if r[1].endswith(FILENAME)]
        assert len(metadata) >= 2
        assert all("hf_hub/" in ua for _, _, ua in metadata)
        gets = [r for r in cdn.request_log() if r.method == "GET" and r.path == blob_path]
        assert gets, "the file was never requested from the CDN"
        assert not [r for r in gets if "hf_hub/" in r.headers.get("User-Agent", "")]  # only the seed
        probes = [r for r in gets if r.headers.get("Range") == "bytes=0-0"]  # the seed's length probe
        assert len(gets) - len(probes) == 1  # one full read for both hosts, whatever the signature
        assert cdn.stats()["by_path"][blob_path] == len(data) + len(probes)
