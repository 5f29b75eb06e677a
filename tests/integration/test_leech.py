"""A leech host (`upload.disable_shared`) downloads but is never anyone's parent.

Real cluster: seed + two peers, peer-1 a leech. peer-1 downloads a file (from the seed); the seed is
then stopped and peer-2 asks for the same file. Were peer-1 offered as a parent, peer-2 would get the
file from it; as a leech it is not, so peer-2 reads the origin and peer-1 uploads nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import dfget_ok

from dfly.cluster import LocalCluster, query_stats
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 8 * MiB


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www") as server:
        yield server


def test_a_leech_is_never_offered_as_a_parent(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=77)
    url = origin.url("/f.bin")
    overrides = {"peer-1": {"upload": {"disable_shared": True}}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides=overrides) as cluster:
        leech, other = cluster.member("peer-1"), cluster.member("peer-2")
        assert leech.ports["piece"] == 0
        dfget_ok(leech, url, tmp_path / "a")
        assert file_digest(tmp_path / "a").value == digest
        cluster.kill_member("seed")
        before = origin.bytes_sent
        dfget_ok(other, url, tmp_path / "b")
        assert file_digest(tmp_path / "b").value == digest
        assert origin.bytes_sent - before >= FILE_BYTES  # peer-2 went to the origin
        assert leech.socket is not None
        assert other.socket is not None
        assert query_stats(leech.socket)["upload_bytes"] == 0
        assert query_stats(other.socket)["download_bytes"]["remote_peer"] == 0
