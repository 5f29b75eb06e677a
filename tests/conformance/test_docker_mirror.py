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

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_kit import MISSING, Registry, push_image, terminate

from dfly.cluster import LocalCluster

RUN_DIR = Path("/run/docker")
NO_DOCKER = [tool for tool in ("dockerd", "docker") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(MISSING + NO_DOCKER), reason=f"not installed: {MISSING + NO_DOCKER}"),
]


class Dockerd:
    """A throw-away dockerd: data, exec root, pid file and API socket under a short directory of /tmp."""

    def __init__(self, mirror: str) -> None:
        self.mirror = mirror
        self.dir = Path(
            tempfile.mkdtemp(prefix="dfly-dk-", dir="/tmp")
        )  # containerd's socket paths are short
        self.socket = self.dir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.made_run_dir = False

    def __enter__(self) -> Dockerd:
        argv = ["dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "docker.pid"), "-H", f"unix://{self.socket}",
                "--config-file", str(self.dir / "daemon.json"), "--storage-driver", "vfs",
                "--bridge", "none", "--iptables=false", "--ip6tables=false",
                "--registry-mirror", self.mirror]  # fmt: skip
        # its trust key stays here too (by default dockerd writes /etc/docker/key.json)
        (self.dir / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(self.dir / "key.json")}))
        self.made_run_dir = not RUN_DIR.exists()
        with open(self.dir / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.docker("version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"dockerd did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.made_run_dir:  # dockerd always makes /run/docker/plugins, whatever its exec root
            shutil.rmtree(RUN_DIR, ignore_errors=True)

    def log(self) -> str:
        return (self.dir / "dockerd.log").read_text(errors="replace")

    def docker(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "-H", f"unix://{self.socket}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)


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
            with Dockerd(f"http://127.0.0.1:{peer.ports['proxy']}") as dockerd:
                done = dockerd.docker("pull", "dflydemo:1")
                assert done.returncode == 0, done.stdout + done.stderr + dockerd.log()[-3000:]
                inspect = dockerd.docker("image", "inspect", "dflydemo:1")
                assert inspect.returncode == 0, inspect.stderr
                [image] = json.loads(inspect.stdout)
                assert len(image["RootFS"]["Layers"]) == 2
                assert image["Id"] == digests[0]  # the image id is its config's digest
            if n == 1:
                assert len(registry.blob_gets()) == before  # the second host's blobs came from the swarm
    gets = registry.blob_gets()[pushed:]
    assert gets, "the seed never read the registry"
    assert not [ua for _, ua, _ in gets if "docker/" in ua], "dockerd fetched a blob from the registry"
