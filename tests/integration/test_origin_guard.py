"""No origin read reaches a link-local or metadata address, whoever asked: a seed that read
`http://169.254.169.254/...` for a dfget (or for anyone who can register a download with the scheduler)
would put its own cloud credentials in the swarm's cache. Refused before any connection is made."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from clusterkit import dfget_cmd

from dfly.cluster import LocalCluster
from dfly.devtools.origin import Origin

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:8080/x"])
def test_a_download_of_a_metadata_address_is_refused(tmp_path: Path, url: str) -> None:
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        out = tmp_path / "out"
        done = subprocess.run(
            dfget_cmd(cluster.member("peer-1"), url, out), capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert "a link-local or metadata address, is not allowed" in done.stderr, done.stderr
    assert not out.exists()


def test_a_seed_reads_no_loopback_origin_for_another_host(tmp_path: Path) -> None:
    """A loopback URL asked on one host names that host's own service: a seed reading it for the swarm
    would serve its own host's (an SSRF into the seed). Unless `seed_peer.loopback_origins` (a cluster
    on one machine, as `dfly up`), the seed refuses before connecting, reports no origin error, and the
    requesting peer reads its own loopback itself."""
    body = bytes(range(256)) * 1200
    with Origin(tmp_path / "origin") as origin:
        url = origin.add_bytes("f.bin", body)
        seed_config = {"seed": {"seed_peer": {"loopback_origins": False}}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=seed_config) as cluster:
            out = tmp_path / "out"
            done = subprocess.run(
                dfget_cmd(cluster.member("peer-1"), url, out), capture_output=True, text=True, timeout=60
            )
            seed_log = cluster.member("seed").log_path.read_text()
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == body
        assert "a link-local, metadata or loopback address, is not allowed" in seed_log
        assert len(origin.request_log()) == 2  # the peer's stat and read; the seed never connected
