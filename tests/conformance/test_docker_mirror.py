"""dockerd pulls a Docker Hub image through the dfdaemon registry mirror (`registry-mirrors`).

Real processes: Debian's docker-registry holding a 2-layer image pushed as `library/dflydemo:1`, the name
a Docker Hub image has; a scheduler, a seed and two peers whose `proxy.registry_mirror` is that registry
(docs/registry-mirror.md: dockerd sends no hint of the upstream); Debian's dockerd 20.10 with every path
under the test's directory, vfs storage, no bridge or iptables, and `--registry-mirror` = one peer's
proxy. dockerd asks a mirror only for Docker Hub images and falls back to registry-1.docker.io, which
cannot be reached here: a pull that succeeds came through the mirror. Checks, for each peer in turn with
a fresh dockerd: `docker pull dflydemo:1` succeeds (dockerd verifies every digest), the image has both
layers, the registry saw no blob GET from docker, and the second pull made no blob GET at all (the
blobs came from the swarm).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerd_kit import NO_DOCKER, Dockerd
from registry_kit import MISSING, Registry, push_image

from dfly.cluster import LocalCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(MISSING + NO_DOCKER), reason=f"not installed: {MISSING + NO_DOCKER}"),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as running:
        yield running


@pytest.mark.timeout(300)
def test_dockerd_pulls_a_docker_hub_image_through_the_mirror(registry: Registry, tmp_path: Path) -> None:
    _, digests = push_image(
        registry, tmp_path / "image", layers=2, layer_bytes=4 << 20, name="library/dflydemo"
    )
    pushed = len(registry.blob_gets())
    overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        for n, peer in enumerate(cluster.peers):
            before = len(registry.blob_gets())
            with Dockerd(mirror=f"http://127.0.0.1:{peer.ports['proxy']}") as dockerd:
                done = dockerd.docker("pull", "dflydemo:1")
                assert done.returncode == 0, done.stdout + done.stderr + dockerd.log()[-3000:]
                # the image id is its config's digest
                assert dockerd.image_layers("dflydemo:1") == (digests[0], 2)
            if n == 1:
                assert len(registry.blob_gets()) == before  # the second host's blobs came from the swarm
    gets = registry.blob_gets()[pushed:]
    assert gets, "the seed never read the registry"
    assert not [ua for _, ua, _ in gets if "docker/" in ua], "dockerd fetched a blob from the registry"
