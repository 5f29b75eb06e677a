"""dockerd pulls from a registry through the dfdaemon forward proxy (`HTTP_PROXY` / `HTTPS_PROXY`).

Docker has a mirror setting only for Docker Hub; for any other registry docs/registry-mirror.md tells
users to give dockerd the daemon as its proxy (a systemd drop-in in real life, its environment here).
Go clients never proxy loopback targets, so the registry (Debian's docker-registry, 2 layers of 4 MiB)
runs in its own network namespace behind a veth pair (registry_netns.py), reached at 10.213.7.2.
- `http`: a plain registry listed as insecure; dockerd sends absolute-form GETs to the proxy, whose
  default rule (`blobs/sha256.*`) serves the layers through P2P.
- `https`: a TLS registry on 443 (a test CA the daemons trust through SSL_CERT_FILE); dockerd sends
  CONNECT, the daemon intercepts it (`proxy.hijack_https.hosts`) with its own CA, which dockerd trusts
  through its SSL_CERT_FILE (as a systemd drop-in would set it), and serves the layers through P2P.
Checks, for each of two peers with a fresh dockerd: `docker pull` succeeds (dockerd verifies every
digest), the image has both layers and its id is the config's digest, the registry served no blob to
dockerd itself (its User-Agent), and the second host's pull made no blob GET at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dockerd_kit import NO_DOCKER, Dockerd
from registry_kit import MISSING, Registry, push_image
from registry_netns import netns_unusable, registry_namespace

from dfly.cluster import LocalCluster
from dfly.devtools.pki import make_pki

NO_NETNS = netns_unusable()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(MISSING + NO_DOCKER), reason=f"not installed: {MISSING + NO_DOCKER}"),
    pytest.mark.skipif(bool(NO_NETNS), reason=f"a registry off loopback: {NO_NETNS}"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_dockerd_pulls_through_the_forward_proxy(
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with registry_namespace() as (address, in_namespace):
        tls = None
        if scheme == "https":
            pki = make_pki(tmp_path / "pki", ["registry"], ips=[address])
            tls = (pki["registry"], pki["registry.key"], pki["ca"])
            monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca"]))  # the daemons' trust, for the registry
        with Registry(
            tmp_path / "registry", address=address, exec_prefix=in_namespace, tls=tls, port=443 if tls else 0
        ) as registry:
            reference, digests = push_image(registry, tmp_path / "image", layers=2, layer_bytes=4 << 20)
            pushed = len(registry.blob_gets())
            proxy: dict[str, object] = {"allowed_hosts": [registry.url]}
            if tls:
                proxy["hijack_https"] = {"hosts": [f"^{re.escape(address)}$"]}
            with LocalCluster(tmp_path / "c", peers=2, daemon_overrides={"*": {"proxy": proxy}}) as cluster:
                for n, peer in enumerate(cluster.peers):
                    before = len(registry.blob_gets())
                    proxy_url = f"http://127.0.0.1:{peer.ports['proxy']}"
                    env = {"HTTP_PROXY": proxy_url, "HTTPS_PROXY": proxy_url}
                    if tls:  # dockerd trusts the certificates its daemon issues for intercepted hosts
                        env["SSL_CERT_FILE"] = str(peer.data_dir / "proxy-ca.crt")
                    insecure = [] if tls else [registry.host]
                    with Dockerd(insecure_registries=insecure, env=env) as dockerd:
                        done = dockerd.docker("pull", reference)
                        assert done.returncode == 0, done.stdout + done.stderr + dockerd.log()[-3000:]
                        # the image id is its config's digest
                        assert dockerd.image_layers(reference) == (digests[0], 2)
                    if n == 1:
                        assert len(registry.blob_gets()) == before  # the second host's blobs: the swarm
            gets = registry.blob_gets()[pushed:]
    assert gets, "the seed never read the registry"
    assert not [ua for _, ua, _ in gets if "docker/" in ua], "dockerd fetched a blob from the registry"
