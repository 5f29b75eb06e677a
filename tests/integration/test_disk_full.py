"""A full disk: a download that does not fit fails with a clear error, and the daemon goes on serving.

peer-1's storage is a 6 MiB tmpfs mounted for the test (root only; skipped otherwise). An 8 MiB file
cannot be admitted (preallocation fails with ENOSPC): dfget exits 1 with one line naming the cause and
leaves no output; a 1 MiB file then downloads with the right bytes, and the daemon stays up.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import dfget_cmd, dfget_ok

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
