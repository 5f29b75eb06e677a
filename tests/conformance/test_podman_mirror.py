"""podman pulls an image through the dfdaemon registry mirror (registries.conf mirror, no upstream hint).

Real processes: Debian's docker-registry with a 2-layer image; a scheduler, a seed and a peer whose
`proxy.registry_mirror` is that registry (podman, like skopeo, sends no hint of the upstream); podman
4.3 rootful with all its state under the test's directory (vfs storage, no daemon), reading
`CONTAINERS_REGISTRIES_CONF`. Checks: the pull succeeds (podman verifies every digest and stores every
layer), `podman image inspect` shows every layer, and the registry saw no blob request from podman.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_kit import MISSING, Registry, push_image, registries_conf

from dfly.cluster import LocalCluster

NO_PODMAN = ["podman"] if shutil.which("podman") is None else []
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(MISSING + NO_PODMAN), reason=f"not installed: {MISSING + NO_PODMAN}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="podman runs rootful here"),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as running:
        yield running


def podman(root: Path, *args: str, conf: Path) -> subprocess.CompletedProcess[str]:
    dirs = ["--root", str(root / "root"), "--runroot", str(root / "run"), "--tmpdir", str(root / "tmp")]
    flags = ["--storage-driver", "vfs", "--events-backend", "file", "--cgroup-manager", "cgroupfs"]
    argv = ["podman", *dirs, *flags, *args]
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.timeout(180)
def test_podman_pulls_through_the_mirror(registry: Registry, tmp_path: Path) -> None:
    reference, digests = push_image(registry, tmp_path / "image", layers=2, layer_bytes=4 << 20)
    pushed = len(registry.blob_gets())
    overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
        conf = registries_conf(tmp_path / "registries.conf", registry, cluster.peers[0].ports["proxy"])
        root = Path(tempfile.mkdtemp(prefix="dfly-podman-", dir="/tmp"))  # podman: runroot <= 50 chars
        try:
            done = podman(root, "pull", reference, conf=conf)
            assert done.returncode == 0, done.stderr
            inspect = podman(root, "image", "inspect", reference, conf=conf)
            assert inspect.returncode == 0, inspect.stderr
            [image] = json.loads(inspect.stdout)
            assert len(image["RootFS"]["Layers"]) == len(digests) - 1  # one diff id per layer
        finally:
            podman(root, "rmi", "--all", "--force", conf=conf)
            shutil.rmtree(root, ignore_errors=True)
        gets = registry.blob_gets()[pushed:]
        assert not [ua for _, ua, _ in gets if "containers" in ua or "podman" in ua], gets
        assert {d for d, _, size in gets if size > 1} == set(digests)
        assert cluster.peers[0].alive()
