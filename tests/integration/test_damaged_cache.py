"""A cached task whose file was truncated under the daemon (an operator's mistake, a bad disk) is
downloaded again on the next request, instead of failing every request until a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from clusterkit import dfget_ok, dfget_popen, stats, task_file, wait_until

from dfly.cluster import LocalCluster, Member
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration


def fetched(peer: Member) -> int:
    """Bytes the daemon got from parents or the origin (a local hit counts as "local_peer")."""
    return sum(n for source, n in stats(peer)["download_bytes"].items() if source != "local_peer")


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


def test_a_seed_whose_stored_piece_changed_while_it_was_stopped_heals_on_a_childs_report(
    tmp_path: Path,
) -> None:
    """The restarted seed announces the task whole; the peer gets the changed piece from it, fails its
    CRC-32 and tells the seed, which reads it back and drops it. The seed, triggered again, reads the
    task back whole before it resumes, and fetches only that piece from the origin."""
    with Origin(tmp_path / "www") as origin, LocalCluster(tmp_path / "c", peers=1) as cluster:
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        size = 4 * MiB  # 256 KiB pieces
        digest = make_file(origin.root / "f.bin", size, seed=63)
        url = origin.url("/f.bin")
        dfget_ok(cluster.seed, url, tmp_path / "on-seed")  # the seed holds the task whole
        cluster.stop_member("seed")
        flip_byte(task_file(cluster.seed.data_dir, url), MiB + 3)  # piece 4
        cluster.restart_member("seed")
        before = origin.bytes_sent

        dfget_ok(cluster.member("peer-1"), url, tmp_path / "on-peer")
        assert file_digest(tmp_path / "on-peer").value == digest
        assert origin.bytes_sent - before < size  # not a whole copy again
        seed_log = cluster.seed.log_path.read_text()
    assert "1 of its 16 stored pieces fail their CRC-32 on disk (a child reported one)" in seed_log


def test_a_seed_trigger_resumes_a_partial_task_only_after_reading_it_back(tmp_path: Path) -> None:
    """The seed was stopped mid-read and a stored byte changed meanwhile; a trigger after its restart
    reads the pieces back before the download resumes, so the changed piece is read from the origin
    again. Before, the resumed download kept it: the seed then held (and served) a rotten piece."""
    size = 16 * MiB  # 256 KiB pieces
    scheduler = {"scheduling": {"seed_failure_ttl_s": 0}}  # the stopped seed may be triggered again
    with (
        Origin(tmp_path / "www", rate_limit_bytes_per_s=4 * MiB) as origin,
        LocalCluster(tmp_path / "c", peers=2, scheduler_overrides=scheduler) as cluster,
    ):
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        digest = make_file(origin.root / "f.bin", size, seed=64)
        url = origin.url("/f.bin")
        seed = cluster.seed
        first = dfget_popen(cluster.member("peer-1"), url, tmp_path / "first")
        try:
            wait_until("the seed read 2 MiB", lambda: fetched(seed) >= 2 * MiB)
            cluster.stop_member("seed")  # its pieces so far are recorded
            assert first.wait(timeout=60) == 0
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        cluster.stop_member("peer-1")  # nobody else holds the task
        flip_byte(task_file(seed.data_dir, url), 100)  # piece 0
        seed = cluster.restart_member("seed")

        dfget_ok(cluster.member("peer-2"), url, tmp_path / "second", timeout_s=90)
        assert file_digest(tmp_path / "second").value == digest
        wait_until("the seed finished its download", lambda: stats(seed)["tasks_succeeded"] >= 1)
        assert file_digest(task_file(seed.data_dir, url)).value == digest
        seed_log = seed.log_path.read_text()
    assert "changed on disk since they were written" in seed_log
