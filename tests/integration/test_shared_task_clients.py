"""Several clients of one task on one daemon: each is held to its own options, not to the first one's.

Real processes (a scheduler, a seed, one peer) and a real origin paced so a read takes seconds. The
task's attempt was built from the first client's request, so its `--timeout` cut every later client
short (with the false message "timed out after 2h"), and its `--disable-back-to-source` failed a later
client that allows the origin.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import dfget_cmd, wait_until

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 16 * MiB
ORIGIN_RATE = 2 * MiB  # a read of about 8 s


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www", rate_limit_bytes_per_s=ORIGIN_RATE) as server:
        assert server.root is not None
        server.root.mkdir(parents=True, exist_ok=True)
        yield server


@pytest.mark.timeout(120)
def test_the_first_clients_timeout_ends_only_its_own_download(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=3)
    url = origin.url("/f.bin")
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        peer = cluster.member("peer-1")
        short = subprocess.Popen(
            dfget_cmd(peer, url, tmp_path / "short", "--timeout", "3s"), stderr=subprocess.PIPE, text=True
        )
        # the second client joins the first one's attempt (well within its 3 s), not a later one
        wait_until(
            "the first request reached the daemon", lambda: "local API download" in peer.log_path.read_text()
        )
        long = subprocess.run(
            dfget_cmd(peer, url, tmp_path / "long"), capture_output=True, text=True, timeout=60
        )
        _, short_err = short.communicate(timeout=30)
        assert short.returncode != 0
        assert "timed out after 3s" in short_err
        assert not (tmp_path / "short").exists()
        assert long.returncode == 0, long.stderr
        assert file_digest(tmp_path / "long").value == digest


@pytest.mark.timeout(120)
def test_a_client_that_allows_the_origin_is_not_failed_by_one_that_does_not(
    origin: Origin, tmp_path: Path
) -> None:
    """No seed (killed), so only the peer itself can read the origin: the first client forbids it, the
    second allows it; both get the file (the attempt reads the origin for the second)."""
    assert origin.root is not None
    digest = make_file(origin.root / "g.bin", FILE_BYTES, seed=4)
    url = origin.url("/g.bin")
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        cluster.kill_member("seed")
        peer = cluster.member("peer-1")
        strict = subprocess.Popen(
            dfget_cmd(peer, url, tmp_path / "strict", "--disable-back-to-source"),
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(
            "the first request reached the daemon", lambda: "local API download" in peer.log_path.read_text()
        )
        allowing = subprocess.run(
            dfget_cmd(peer, url, tmp_path / "allowing"), capture_output=True, text=True, timeout=90
        )
        _, strict_err = strict.communicate(timeout=60)
        assert allowing.returncode == 0, allowing.stderr
        assert file_digest(tmp_path / "allowing").value == digest
        assert strict.returncode == 0, strict_err
        assert file_digest(tmp_path / "strict").value == digest
        assert origin.bytes_sent <= FILE_BYTES * 1.05
