"""The seed peer dies while it is still reading the origin, or hangs (issue 4, service level).

Real processes: scheduler, seed and two peers on 127.0.0.1; a real origin paced so that the seed's read
takes seconds. Both peers download; the seed is SIGKILLed when they have a few MiB. The scheduler sees
its peer gone, remembers the seed failed, and sends one waiting peer to the origin; the other gets the
rest from it. Both finish with the right bytes, and the origin sends less than the three copies that
"every host reads the origin" would cost. A stopped (SIGSTOP) seed costs the first download one trigger
timeout; later downloads of other files do not try it again. An origin that trickles fails the seed's
read within the piece timeout, and the peer's download with that cause.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import Downloads, dfget_cmd, dfget_each_ok, has_2_mib_from_parents, hung, stats, wait_until

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 48 * MiB
ORIGIN_RATE = 8 * MiB
DFGET_TIMEOUT_S = 90.0


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www", rate_limit_bytes_per_s=ORIGIN_RATE) as server:
        yield server


def test_seed_killed_mid_origin_read_one_peer_takes_over(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=57)
    url = origin.url("/f.bin")
    with LocalCluster(tmp_path / "c", peers=2) as cluster:
        peers = [cluster.member("peer-1"), cluster.member("peer-2")]
        with Downloads() as downloads:
            for peer in peers:
                downloads.start(peer, url, tmp_path / peer.name)
            for peer in peers:
                wait_until(f"{peer.name} has 2 MiB", functools.partial(has_2_mib_from_parents, peer))
            cluster.kill_member("seed")
            seed_read = origin.bytes_sent
            assert seed_read < FILE_BYTES, "the seed finished before it was killed"
            downloads.finish(DFGET_TIMEOUT_S)
        for peer in peers:
            assert file_digest(tmp_path / peer.name).value == digest
        readers = [p for p in peers if stats(p)["download_bytes"]["back_to_source"] > 0]
        assert len(readers) == 1, "exactly one peer should have taken over the origin read"
        assert origin.bytes_sent - seed_read <= 1.05 * FILE_BYTES
        assert origin.bytes_sent < 2 * FILE_BYTES


def test_a_hung_seed_costs_one_trigger_timeout_not_one_per_task(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    files = [(origin.url(f"/{n}.bin"), make_file(origin.root / f"{n}.bin", MiB, seed=60 + n))
             for n in range(3)]  # fmt: skip
    overrides = {"seed_trigger": {"timeout_s": 1.0}}
    with LocalCluster(tmp_path / "c", peers=1, scheduler_overrides=overrides) as cluster:
        with hung(cluster.seed):
            dfget_each_ok(cluster.member("peer-1"), files, tmp_path, DFGET_TIMEOUT_S)
        log = cluster.scheduler.log_path.read_text()
    assert log.count("failed DownloadTask") == 1, log[-3000:]  # the seed was tried for the first file only


def test_an_origin_that_trickles_fails_the_download_within_the_piece_timeout(tmp_path: Path) -> None:
    """An origin that keeps the connection alive but sends a 256 KiB piece in ~12 s (64 KiB every 4 s):
    each socket read is well within the read timeout, so only `download.piece_timeout_s` ends the seed's
    read. The peer's dfget fails in seconds with that cause, not after the whole trickle."""
    overrides = {"*": {"download": {"piece_timeout_s": 1.0}}}
    with Origin(tmp_path / "www", rate_limit_bytes_per_s=16 * 1024) as origin:
        assert origin.root is not None
        origin.root.mkdir(parents=True, exist_ok=True)
        make_file(origin.root / "slow.bin", MiB, seed=71)
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
            peer = cluster.member("peer-1")
            started = time.monotonic()
            result = subprocess.run(dfget_cmd(peer, origin.url("/slow.bin"), tmp_path / "out"),
                                    capture_output=True, text=True, timeout=DFGET_TIMEOUT_S)  # fmt: skip
            elapsed = time.monotonic() - started
            seed_log = cluster.seed.log_path.read_text()
    assert result.returncode != 0
    assert "too slowly" in result.stderr, result.stderr
    assert "download.piece_timeout_s (1 s)" in result.stderr
    assert "too slowly" in seed_log  # the seed's read ended by the deadline too
    assert elapsed < 30  # the whole trickle would take ~48 s; one read timeout alone 60 s
    assert not (tmp_path / "out").exists()
