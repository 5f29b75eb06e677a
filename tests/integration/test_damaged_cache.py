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


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as stored:
        stored.seek(offset)
        byte = stored.read(1)
        stored.seek(offset)
        stored.write(bytes([byte[0] ^ 0x01]))


def test_a_byte_changed_while_the_daemon_was_stopped_is_fetched_again(tmp_path: Path) -> None:
    """The daemon re-reads a task held from before its restart at the first local use: the piece whose
    byte changed on disk (and only that piece) comes again from the origin; dfget gets the right bytes.
    Before, the cache hit checked only the file's size and dfget exited 0 with the flipped byte."""
    with Origin(tmp_path / "www") as origin, LocalCluster(tmp_path / "c", peers=1) as cluster:
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        size = 4 * MiB  # 256 KiB pieces
        digest = make_file(origin.root / "f.bin", size, seed=62)
        url = origin.url("/f.bin")
        peer = cluster.member("peer-1")
        dfget_ok(peer, url, tmp_path / "first")
        cluster.stop_member("peer-1")
        stored = task_file(peer.data_dir, url)
        flip_byte(stored, 3 * MiB + 5)  # piece 12
        flip_byte(stored, 4 * MiB - 1)  # piece 15, the last
        peer = cluster.restart_member("peer-1")

        dfget_ok(peer, url, tmp_path / "second")
        assert file_digest(tmp_path / "second").value == digest
        assert fetched(peer) == 2 * 256 * 1024
        assert "2 of its 16 stored pieces changed on disk" in peer.log_path.read_text()
