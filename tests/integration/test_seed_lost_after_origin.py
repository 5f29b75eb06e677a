"""The seed finished reading the origin, then dies (SIGKILL), stops (SIGTERM) or serves a corrupt
piece while peers still copy from it (chaos audit D1, D3).

Real processes on 127.0.0.1: scheduler, seed and two peers. The seed's uploads are paced so that the
peers hold only a few MiB when it goes. Nobody else holds the whole object, so the scheduler sends one
running peer back to the origin; the other gets the rest from it. Before, both peers waited on each
other (each held the other as a working parent, neither had the missing pieces) until dfget's timeout.
A corrupt piece on the seed (a byte flipped on its disk) fails its CRC at both peers; their reports
suspend the seed's host, and the same takeover follows; the seed, told by the first of them, reads its
copy back and drops the piece.
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import (
    Downloads,
    dfget_cmd,
    from_parents,
    has_2_mib_from_parents,
    stats,
    task_file,
    wait_until,
)

from dfly.cluster import LocalCluster, Member
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB, default_piece_length
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 16 * MiB
PIECE_BYTES = default_piece_length(FILE_BYTES)
SEED_UPLOAD = 4 * MiB  # bytes per second, shared by both peers
DFGET_TIMEOUT_S = 60.0


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www") as server:
        yield server


def read_whole(seed: Member) -> bool:
    return int(stats(seed)["download_bytes"]["back_to_source"]) >= FILE_BYTES


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_seed_gone_after_its_origin_read_one_peer_reads_the_rest(
    origin: Origin, tmp_path: Path, how: str
) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=91)
    url = origin.url("/f.bin")
    overrides = {"seed": {"upload": {"rate_limit_bytes_per_s": SEED_UPLOAD}}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        peers = [cluster.member("peer-1"), cluster.member("peer-2")]
        with Downloads() as downloads:
            for peer in peers:
                downloads.start(peer, url, tmp_path / peer.name)
            for peer in peers:
                wait_until(f"{peer.name} has 2 MiB", functools.partial(has_2_mib_from_parents, peer))
            wait_until("the seed read the whole origin", functools.partial(read_whole, cluster.seed))
            seed_read = origin.bytes_sent
            if how == "kill":
                cluster.kill_member("seed")
            else:
                cluster.stop_member("seed")
            assert sum(from_parents(p) for p in peers) < 2 * FILE_BYTES, "the peers were done already"
            downloads.finish(DFGET_TIMEOUT_S)
        for peer in peers:
            assert file_digest(tmp_path / peer.name).value == digest
        readers = [p for p in peers if stats(p)["download_bytes"]["back_to_source"] > 0]
        assert len(readers) == 1, "exactly one peer should have read the rest from the origin"
        assert origin.bytes_sent - seed_read <= FILE_BYTES


def unheld_pieces(peer_files: list[Path], count: int) -> list[int]:
    """The last `count` pieces no peer has written yet (their regions still zeros in every peer's
    preallocated file; random content has no all-zero piece), so the peers must still fetch them. Two,
    not one: the piece being sent at the moment of the flip was read before it and arrives intact."""
    found = [
        number
        for number in reversed(range(FILE_BYTES // PIECE_BYTES))
        if all(not f.exists() or not any(read_at(f, number * PIECE_BYTES, PIECE_BYTES)) for f in peer_files)
    ]
    if len(found) < count:
        pytest.fail(f"only {len(found)} pieces are still missing everywhere")
    return found[:count]


def read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


@pytest.mark.parametrize("peer_count", [1, 2])
def test_a_piece_corrupt_on_the_only_whole_copy_is_read_again_from_the_origin(
    origin: Origin, tmp_path: Path, peer_count: int
) -> None:
    """Two pieces no peer holds yet are flipped on the seed, the only whole copy. The first peer that
    gets a bad piece tells the seed, which reads its copy back and drops the piece. Two peers' reports
    suspend the seed's host: one peer reads the rest from the origin. One peer alone is no quorum: the
    scheduler triggers the seed again, which reads the dropped pieces from the origin. Either way the
    origin sends less than one copy more, and every peer gets the right bytes."""
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=92)
    url = origin.url("/f.bin")
    overrides = {"seed": {"upload": {"rate_limit_bytes_per_s": SEED_UPLOAD}}}
    with LocalCluster(tmp_path / "c", peers=peer_count, daemon_overrides=overrides) as cluster:
        peers = [cluster.member(f"peer-{n + 1}") for n in range(peer_count)]
        with Downloads() as downloads:
            for peer in peers:
                downloads.start(peer, url, tmp_path / peer.name)
            wait_until("the seed read the whole origin", functools.partial(read_whole, cluster.seed))
            seed_read = origin.bytes_sent
            with task_file(cluster.seed.data_dir, url).open("r+b") as stored:
                for number in unheld_pieces([task_file(p.data_dir, url) for p in peers], 2):
                    stored.seek(number * PIECE_BYTES)
                    byte = stored.read(1)
                    stored.seek(number * PIECE_BYTES)
                    stored.write(bytes([byte[0] ^ 0xFF]))
            assert sum(from_parents(p) for p in peers) < peer_count * FILE_BYTES - MiB, "the peers were done"
            downloads.finish(DFGET_TIMEOUT_S)
        for peer in peers:
            assert file_digest(tmp_path / peer.name).value == digest
        readers = [p for p in peers if stats(p)["download_bytes"]["back_to_source"] > 0]
        assert len(readers) <= 1, "at most one peer should have read the rest from the origin"
        assert origin.bytes_sent - seed_read < FILE_BYTES
        seed_log = cluster.seed.log_path.read_text()
        assert "1 of its 64 stored pieces fail their CRC-32 on disk (a child reported one)" in seed_log


def test_peers_that_may_not_read_the_origin_fail_promptly_when_the_only_seed_dies(
    origin: Origin, tmp_path: Path
) -> None:
    """`--disable-back-to-source` and the task's only seed gone: no other seed can be triggered, so the
    peers fail with the reason within seconds (before, they waited for dfget's timeout, 2 h by default)."""
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    make_file(origin.root / "f.bin", FILE_BYTES, seed=93)
    url = origin.url("/f.bin")
    overrides = {"seed": {"upload": {"rate_limit_bytes_per_s": SEED_UPLOAD}}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        peers = [cluster.member("peer-1"), cluster.member("peer-2")]
        procs = []
        try:
            for peer in peers:
                command = dfget_cmd(peer, url, tmp_path / peer.name, "--disable-back-to-source")
                procs.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
            for peer in peers:
                wait_until(f"{peer.name} has 2 MiB", functools.partial(has_2_mib_from_parents, peer))
            cluster.kill_member("seed")
            started = time.monotonic()
            errors = [proc.communicate(timeout=DFGET_TIMEOUT_S)[1] for proc in procs]
            elapsed = time.monotonic() - started
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert [proc.returncode for proc in procs] == [1, 1], errors
    for error in errors:
        assert "back-to-source is disabled" in error, error
    assert elapsed < 30  # source_return_s after the peers stop trading, not dfget's timeout
    assert not (tmp_path / "peer-1").exists()
