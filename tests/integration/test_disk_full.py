"""A full disk: the storage GC makes room for a new download, and one that still does not fit fails
with a clear error while the daemon goes on serving.

peer-1's storage is a 6 MiB tmpfs mounted for each test (root only; skipped otherwise).
- An 8 MiB file cannot be admitted (preallocation fails with ENOSPC): dfget exits 1 with one line naming
  the cause and leaves no output; a 1 MiB file then downloads with the right bytes, and the daemon stays up.
- Four 1 MiB files fill it to ~70 %; the first is used again. A fifth file of 2 MiB does not fit (without
  the GC its download fails with ENOSPC); before its file is created, the least recently used tasks (the
  second, third and fourth file) are evicted down to the 60 % mark: the download succeeds and the re-used
  first file stays.
- With `gc.disk_quota_bytes` and its own marks instead (no tmpfs): the task files' bytes decide, and
  eviction goes down to the configured low mark.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import dfget_cmd, dfget_ok, stats, task_file

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_download_that_does_not_fit_fails_clearly_and_the_daemon_goes_on(
    small_disk: Path, tmp_path: Path
) -> None:
    overrides = {"peer-1": {"storage": {"dir": str(small_disk / "data")}}}
    with (
        Origin(tmp_path / "www") as origin,
        LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        make_file(origin.root / "big.bin", 8 * MiB, seed=41)
        small = make_file(origin.root / "small.bin", 1 * MiB, seed=42)
        peer = cluster.peers[0]
        command = dfget_cmd(peer, origin.url("/big.bin"), tmp_path / "big.out")
        failed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1
        assert "No space left on device" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
        assert "Traceback" not in failed.stderr
        assert not (tmp_path / "big.out").exists()
        dfget_ok(peer, origin.url("/small.bin"), tmp_path / "small.out")
        assert file_digest(tmp_path / "small.out").value == small
        assert peer.alive()


def evict_for_a_new_download(
    tmp_path: Path, data: Path, gc: dict[str, int], last_mib: int
) -> tuple[set[str], int]:
    """peer-1 (storage in `data`, `gc` overrides) downloads a, b, c, d (1 MiB each), uses "a" again (so it
    is the most recently used), then downloads e (`last_mib` MiB); returns the tasks it then holds and the
    number evicted. Checks every output's bytes, and that an evicted task ("b") downloads again."""
    overrides: dict[str, dict[str, dict[str, object]]] = {
        "peer-1": {"storage": {"dir": str(data)}, "gc": dict(gc)}
    }
    with (
        Origin(tmp_path / "www") as origin,
        LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        names = ["a", "b", "c", "d", "e"]
        sizes = {"a": 1 * MiB, "b": 1 * MiB, "c": 1 * MiB, "d": 1 * MiB, "e": last_mib * MiB}
        digests = {n: make_file(origin.root / f"{n}.bin", sizes[n], seed=60 + i) for i, n in enumerate(names)}
        urls = {n: origin.url(f"/{n}.bin") for n in names}
        peer = cluster.peers[0]
        for name in ["a", "b", "c", "d"]:
            dfget_ok(peer, urls[name], tmp_path / f"out-{name}")
        local_before = stats(peer)["download_bytes"]["local_peer"]
        dfget_ok(peer, urls["a"], tmp_path / "a-again")  # "a" is now the most recently used
        assert stats(peer)["download_bytes"]["local_peer"] == local_before + 1 * MiB
        assert stats(peer)["gc"]["evicted_tasks"] == 0
        dfget_ok(peer, urls["e"], tmp_path / "out-e")  # does not fit below the high mark
        assert file_digest(tmp_path / "out-e").value == digests["e"]
        held = {n for n in names if task_file(data, urls[n]).exists()}
        evicted = stats(peer)["gc"]["evicted_tasks"]
        dfget_ok(peer, urls["b"], tmp_path / "b-again")  # an evicted task downloads again, correct
        assert file_digest(tmp_path / "b-again").value == digests["b"]
        assert peer.alive()
    return held, evicted


def test_a_full_disk_evicts_the_least_recently_used_tasks_for_a_new_download(
    small_disk: Path, tmp_path: Path
) -> None:
    """6 MiB of filesystem, gc defaults (80 % -> 60 %): e (2 MiB) does not fit, so b, c and d go."""
    held, evicted = evict_for_a_new_download(tmp_path, small_disk / "data", {}, last_mib=2)
    assert (held, evicted) == ({"a", "e"}, 3)
    usage = os.statvfs(small_disk)
    assert usage.f_bavail / usage.f_blocks > 0.2  # below the high mark again


def test_a_quota_and_its_marks_decide_what_is_evicted_for_a_new_download(tmp_path: Path) -> None:
    """`gc.disk_quota_bytes` counts only the task files' bytes (no tmpfs, no root needed), with marks of
    75 % and 40 % instead of the defaults: with e (3 MiB), 7 of 8 MiB is above 75 %, so b, c, d and then
    a go (down to 40 %: 3.2 MiB); the defaults (80 % -> 60 %) would keep "a"."""
    gc = {"disk_quota_bytes": 8 * MiB, "disk_high_threshold_percent": 75, "disk_low_threshold_percent": 40}
    held, evicted = evict_for_a_new_download(tmp_path, tmp_path / "data", gc, last_mib=3)
    assert (held, evicted) == ({"e"}, 4)
