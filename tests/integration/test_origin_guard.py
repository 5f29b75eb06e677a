"""No origin read reaches a link-local or metadata address, whoever asked: a seed that read
`http://169.254.169.254/...` for a dfget (or for anyone who can register a download with the scheduler)
would put its own cloud credentials in the swarm's cache. Refused before any connection is made."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from clusterkit import dfget_cmd

from dfly.cluster import LocalCluster

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
