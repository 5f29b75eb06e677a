"""A cached task whose file was truncated under the daemon (an operator's mistake, a bad disk) is
downloaded again on the next request, instead of failing every request until a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clusterkit import dfget_ok, stats, task_file

from dfly.cluster import LocalCluster, Member
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration


def fetched(peer: Member) -> int:
    """Bytes the daemon got from parents or the origin (a local hit counts as "local")."""
    return sum(n for source, n in stats(peer)["download_bytes"].items() if source != "local")


def test_a_truncated_task_file_is_downloaded_again(tmp_path: Path) -> None:
    with Origin(tmp_path / "www") as origin, LocalCluster(tmp_path / "c", peers=1) as cluster:
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        digest = make_file(origin.root / "f.bin", 2 * MiB, seed=61)
        url = origin.url("/f.bin")
        peer = cluster.member("peer-1")
        dfget_ok(peer, url, tmp_path / "first")
        received = fetched(peer)
        os.truncate(task_file(peer.data_dir, url), MiB)

        dfget_ok(peer, url, tmp_path / "second")
        assert file_digest(tmp_path / "second").value == digest
        assert fetched(peer) - received == 2 * MiB
        assert task_file(peer.data_dir, url).stat().st_size == 2 * MiB
