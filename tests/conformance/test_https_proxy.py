"""HTTPS through the dfdaemon's proxy (`https_proxy=` / `curl -x`): CONNECT, tunnel and interception.

Real processes: an HTTPS origin on 127.0.0.1 with a test CA (the daemons trust it through SSL_CERT_FILE),
a scheduler, a seed and two peers with `proxy.hijack_https.hosts: ["^localhost$"]`, each with the CA it
generated in its storage directory. Checks, with curl:
- `https://localhost:PORT/...` is intercepted: curl trusts only the daemon's CA, gets the bytes through
  P2P (`X-Dragonfly-Task-ID`), and the second host's copy costs the origin nothing; Range gets 206; a
  file no rule matches is forwarded to the origin inside the interception.
- `https://127.0.0.1:PORT/...` (not intercepted) is a plain tunnel: curl sees the origin's own certificate.
- A target outside `proxy.allowed_hosts` gets 403 to its CONNECT and no connection is made; a client that
  does not trust the daemon's CA fails its handshake and the daemon logs no traceback.
- With proxy basic auth, a CONNECT without credentials gets 407.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_metrics import proxy_counts

from dfly.cluster import LocalCluster
from dfly.devtools.origin import Origin, make_file
from dfly.devtools.pki import make_pki

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
]
MiB = 1 << 20


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    paths = make_pki(tmp_path / "pki", ["origin"])
    monkeypatch.setenv("SSL_CERT_FILE", str(paths["ca"]))  # inherited by the daemons (origin reads)
    return paths


@pytest.fixture
def origin(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Origin]:
    with Origin(tmp_path / "www", certfile=pki["origin"], keyfile=pki["origin.key"]) as server:
        assert server.root is not None
        server.root.mkdir(parents=True, exist_ok=True)
        yield server


def curl(proxy: int, url: str, out: Path, *extra: str) -> tuple[int, int, dict[str, str]]:
    """curl through the proxy: (exit code, the CONNECT answer's status, response headers with ':status')."""
    head = out.with_suffix(".headers")
    argv = ["curl", "-s", "-x", f"http://127.0.0.1:{proxy}", "-D", str(head), "-o", str(out)]
    argv += ["-w", "%{http_connect}", *extra, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    # -D holds the CONNECT answer first, then the response's own head
    text = head.read_bytes().decode("latin-1") if head.exists() else ""
    blocks = [b for b in text.split("\r\n\r\n") if b.strip()]
    headers: dict[str, str] = {}
    if blocks and not blocks[-1].startswith("HTTP/1.1 200 Connection"):
        lines = blocks[-1].splitlines()
        headers[":status"] = lines[0].split()[1]
        headers.update(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)
        )
    return done.returncode, int(done.stdout.strip() or 0), headers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_connect_is_intercepted_for_listed_hosts_and_tunnelled_for_others(
    origin: Origin, pki: dict[str, Path], tmp_path: Path
) -> None:
    assert origin.root is not None
    digest = make_file(origin.root / "model.bin", 8 * MiB, seed=61)
    make_file(origin.root / "notes.txt", 64 * 1024, seed=62)
    by_name, by_ip = f"https://localhost:{origin.port}", f"https://127.0.0.1:{origin.port}"
    proxy = {
        "proxy": {
            "allowed_hosts": [by_name, by_ip],
            "rules": [r"\.bin$"],
            "hijack_https": {"hosts": ["^localhost$"]},
        }
    }
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides={"*": proxy}) as cluster:
        first, second = cluster.peers
        cas = [peer.data_dir / "proxy-ca.crt" for peer in (first, second)]
        assert cas[0].read_bytes() != cas[1].read_bytes()  # each daemon generated its own
        p1, p2 = first.ports["proxy"], second.ports["proxy"]

        rc, connect, headers = curl(p1, f"{by_name}/model.bin", tmp_path / "a.bin", "--cacert", str(cas[0]))
        assert (rc, connect, headers[":status"]) == (0, 200, "200")
        assert headers["x-dragonfly-task-id"]
        assert sha(tmp_path / "a.bin") == digest
        sent = origin.bytes_sent
        rc, _, headers = curl(p2, f"{by_name}/model.bin", tmp_path / "b.bin", "--cacert", str(cas[1]))
        assert (rc, headers[":status"]) == (0, "200")
        assert sha(tmp_path / "b.bin") == digest
        assert origin.bytes_sent == sent  # the second host got it from the swarm

        rc, _, headers = curl(
            p2, f"{by_name}/model.bin", tmp_path / "part", "--cacert", str(cas[1]), "-r", "1000-1999"
        )
        assert (rc, headers[":status"]) == (0, "206")
        assert (tmp_path / "part").read_bytes() == (tmp_path / "a.bin").read_bytes()[1000:2000]

        rc, _, headers = curl(p1, f"{by_name}/notes.txt", tmp_path / "notes", "--cacert", str(cas[0]))
        assert (rc, headers[":status"]) == (0, "200")
        assert "x-dragonfly-task-id" not in headers  # no rule matches: forwarded inside the interception
        assert (tmp_path / "notes").read_bytes() == (origin.root / "notes.txt").read_bytes()

        # not intercepted: a byte tunnel, so curl must trust the origin's own CA, not the daemon's
        rc, _, _ = curl(p1, f"{by_ip}/model.bin", tmp_path / "no-trust", "--cacert", str(cas[0]))
        assert rc == 60  # the peer's certificate is not signed by the daemon's CA
        rc, _, headers = curl(p1, f"{by_ip}/model.bin", tmp_path / "c.bin", "--cacert", str(pki["ca"]))
        assert (rc, headers[":status"]) == (0, "200")
        assert "x-dragonfly-task-id" not in headers
        assert sha(tmp_path / "c.bin") == digest
        assert origin.request_log()[-1].headers.get("User-Agent", "").startswith("curl/")

        requests = len(origin.request_log())
        rc, connect, _ = curl(p1, f"https://127.0.0.2:{origin.port}/model.bin", tmp_path / "x", "-k")
        assert (rc != 0, connect) == (True, 403)
        rc, connect, _ = curl(p1, f"{by_name}/model.bin", tmp_path / "y")  # the daemon's CA not trusted
        assert (rc, connect) == (60, 200)
        assert len(origin.request_log()) == requests  # neither reached the origin
        # Prometheus, peer-1: 6 CONNECTs (4 served, 1 refused, 1 whose client refused our certificate:
        # counted once the daemon's side of that handshake ended), 2 requests inside its interceptions
        deadline = time.monotonic() + 10
        while (counts := proxy_counts(first))[("requests", "connect")] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (counts[("requests", "connect")], counts[("request_failures", "connect")]) == (6, 2)
        assert (counts[("requests", "forward")], counts[("requests_via_p2p", "forward")]) == (2, 1)
        logs = "".join(m.log_path.read_text() for m in cluster.members)
    assert "Traceback" not in logs


def test_connect_needs_proxy_auth_when_configured(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    digest = make_file(origin.root / "model.bin", 1 * MiB, seed=63)
    url = f"https://localhost:{origin.port}/model.bin"
    proxy = {"proxy": {"allowed_hosts": [f"https://localhost:{origin.port}"],
                       "hijack_https": {"hosts": ["^localhost$"]},
                       "basic_auth_username": "ops", "basic_auth_password": "pw-1234"}}  # fmt: skip
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides={"*": proxy}) as cluster:
        peer = cluster.peers[0]
        ca = str(peer.data_dir / "proxy-ca.crt")
        rc, connect, _ = curl(peer.ports["proxy"], url, tmp_path / "no", "--cacert", ca)
        assert (rc != 0, connect) == (True, 407)
        assert origin.requests == 0
        rc, connect, headers = curl(
            peer.ports["proxy"], url, tmp_path / "yes", "--cacert", ca, "--proxy-user", "ops:pw-1234"
        )
        assert (rc, connect, headers[":status"]) == (0, 200, "200")
        assert sha(tmp_path / "yes") == digest
