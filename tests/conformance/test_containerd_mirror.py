"""containerd pulls an image through the dfdaemon registry mirror, and a second host makes no blob request.

Real processes: Debian's docker-registry with a 2-layer image; a scheduler, a seed and two peers whose
`proxy.registry_mirror` is that registry; two throw-away containerd daemons (one per "host"), each
pulling with `ctr images pull --hosts-dir` (hosts.toml: the mirror with pull and resolve, the way
containerd adds `?ns=<registry>` to every mirror request) and unpacking into the native snapshotter.
Checks: both pulls succeed (containerd verifies every digest and unpacks every layer), the content
store holds every blob, the registry saw no blob request from containerd and one full copy of each blob
in all.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_kit import MISSING, Containerd, Registry, hosts_dir, push_image

from dfly.cluster import LocalCluster

NO_CONTAINERD = [tool for tool in ("containerd", "ctr") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(MISSING + NO_CONTAINERD), reason=f"not installed: {MISSING + NO_CONTAINERD}"),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as running:
        yield running


@pytest.mark.timeout(180)
def test_ctr_pulls_through_the_mirror_and_a_second_host_asks_the_registry_for_no_blob(
    registry: Registry, tmp_path: Path
) -> None:
    reference, digests = push_image(registry, tmp_path / "image", layers=2, layer_bytes=8 << 20)
    pushed = len(registry.blob_gets())
    overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        for peer in cluster.peers:
            with Containerd(tmp_path / f"containerd-{peer.name}") as containerd:
                hosts = hosts_dir(tmp_path / f"hosts-{peer.name}", registry, peer.ports["proxy"])
                done = containerd.pull(reference, hosts)
                assert done.returncode == 0, done.stdout + done.stderr
                assert set(digests) <= containerd.content_digests()
            after_first = Counter(d for d, _, size in registry.blob_gets()[pushed:] if size > 1)
            assert after_first == Counter(digests)  # the second host adds nothing
        gets = registry.blob_gets()[pushed:]
        assert not [ua for _, ua, _ in gets if "containerd" in ua], "containerd fetched a blob itself"
        assert all(m.alive() for m in cluster.members)


INVERT = bytes(255 - b for b in range(256))


def flip_every_task_file(data_dir: Path) -> int:
    """Invert every byte of every task file under a daemon's storage (recorded digests unchanged)."""
    files = [p for p in (data_dir / "tasks").rglob("*") if p.is_file()]
    for path in files:
        path.write_bytes(path.read_bytes().translate(INVERT))
    return len(files)


@pytest.mark.timeout(180)
def test_a_corrupt_cache_on_the_only_parent_never_reaches_containerd(
    registry: Registry, tmp_path: Path
) -> None:
    """peer-1 pulled the image, then every byte of its cache is flipped and the seed is stopped: peer-2's
    only parent serves bytes that fail their CRC. containerd's pull through peer-2 still succeeds with
    every digest right (peer-2 drops the bad parent and reads what it lacks from the registry), and
    `ctr images check` finds the image complete in containerd's content store."""
    reference, digests = push_image(registry, tmp_path / "image", layers=2, layer_bytes=4 << 20)
    overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        first, second = cluster.peers
        with Containerd(tmp_path / "containerd-1") as containerd:
            done = containerd.pull(reference, hosts_dir(tmp_path / "hosts-1", registry, first.ports["proxy"]))
            assert done.returncode == 0, done.stderr
        assert flip_every_task_file(first.data_dir) == len(digests)
        cluster.stop_member("seed")
        with Containerd(tmp_path / "containerd-2") as containerd:
            hosts = hosts_dir(tmp_path / "hosts-2", registry, second.ports["proxy"])
            done = containerd.pull(reference, hosts)
            assert done.returncode == 0, done.stdout + done.stderr
            assert set(digests) <= containerd.content_digests()
            check = subprocess.run(
                containerd.ctr_argv("images", "check"), capture_output=True, text=True, timeout=60, check=True
            )
            assert "complete" in check.stdout
        assert "fails its CRC-32" in second.log_path.read_text()
        assert second.alive()
