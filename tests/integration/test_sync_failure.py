"""A failed fdatasync mid-download: the daemon forgets those pieces, fetches them again, stays consistent.

peer-1 runs the real dfdaemon through this file (`python test_sync_failure.py daemon ARGS...`), whose
only change is that `os.fdatasync` of a task file fails with EIO once, at its first call: the first group
commit, always in the middle of the download (commits every 0.1 s, the seed's upload capped so the
download lasts over a second; a later call could be the last commit on a disk whose syncs are slow).
After a failed fdatasync the page cache of that file cannot be trusted, so the daemon must drop the
pieces of that commit, never serve them, fetch them again, and record only durable pieces. The test
checks the output's SHA-256, that peer-1 downloaded more than one copy (the lost pieces twice), the
error in its log, and, after a restart of peer-1, that the task is whole on disk (a second dfget needs
no download at all).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import dfget_ok, stats

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 8 * MiB
FAIL_AT_CALL = 1


def run_daemon_with_one_failed_sync(argv: list[str]) -> int:
    """`dfdaemon` main, but in peer-1 the FAIL_AT_CALL-th os.fdatasync raises EIO."""
    from dfly.cli import dfdaemon

    if any("peer-1" in arg for arg in argv):
        real, calls = os.fdatasync, [0]

        def flaky_fdatasync(fd: Any) -> None:
            calls[0] += 1
            if calls[0] == FAIL_AT_CALL:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        os.fdatasync = flaky_fdatasync
    return dfdaemon.main(argv)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www") as server:
        yield server


def fetched(peer_stats: dict[str, object]) -> int:
    """Bytes the daemon got from the network (parents and origin), not from its own cache."""
    by_source = peer_stats["download_bytes"]
    assert isinstance(by_source, dict)
    return sum(int(v) for source, v in by_source.items() if source != "local_peer")


def test_pieces_of_a_failed_sync_are_fetched_again(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=7)
    with LocalCluster(
        tmp_path / "c",
        peers=1,
        seed_upload_limit_bytes_per_s=4 * MiB,
        daemon_cmd=[sys.executable, __file__, "daemon"],
        daemon_overrides={"peer-1": {"storage": {"commit_interval_s": 0.1}}},
    ) as cluster:
        peer = cluster.peers[0]
        dfget_ok(peer, origin.url("/f.bin"), tmp_path / "out")
        assert file_digest(tmp_path / "out").value == digest
        first = stats(peer)
        assert fetched(first) > FILE_BYTES  # the pieces of the failed commit came twice
        assert "were not synced to disk" in (peer.log_path.read_text())

        cluster.stop_member(peer.name)  # clean: its last group commit is done
        peer = cluster.restart_member(peer.name)
        dfget_ok(peer, origin.url("/f.bin"), tmp_path / "again")
        assert file_digest(tmp_path / "again").value == digest
        assert fetched(stats(peer)) == 0  # whole on disk: every piece was recorded durable
        assert all(m.alive() for m in cluster.members)


if __name__ == "__main__" and sys.argv[1:2] == ["daemon"]:
    sys.exit(run_daemon_with_one_failed_sync(sys.argv[2:]))
