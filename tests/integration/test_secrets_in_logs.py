"""Secrets never reach a log nor a daemon's database: tokens in query strings, Authorization headers and
a password in the URL, with the daemons logging at debug level.

A real cluster (scheduler, seed, one peer) logging at debug level downloads a presigned-style URL with
an Authorization header, then is handed a malformed URL carrying a token; afterwards no log file under
the cluster's directory may contain either secret, while the origin did receive them (so the test would
see them if they leaked).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import dfget_cmd

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

QUERY_SECRET = "qs3cr3t-7f1d"
HEADER_SECRET = "hs3cr3t-92ab"
USER_SECRET = "us3cr3t-5e0c"
DFGET_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    with Origin(tmp_path_factory.mktemp("www")) as server:
        yield server


def dfget(cluster: LocalCluster, url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*dfget_cmd(cluster.peers[0], url, out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=DFGET_TIMEOUT_S, check=False)


def test_tokens_and_passwords_never_reach_a_log_or_a_database(origin: Origin, tmp_path: Path) -> None:
    assert origin.root is not None
    digest = make_file(origin.root / "private.bin", 2 * MiB, seed=41)
    with LocalCluster(tmp_path / "c", peers=1, log_level="debug") as cluster:
        url = origin.url(f"/private.bin?X-Amz-Signature={QUERY_SECRET}&token={QUERY_SECRET}")
        url = url.replace(
            "://", f"://alice:{USER_SECRET}@", 1
        )  # a password in the URL (-H wins for the origin)
        ok = dfget(cluster, url, tmp_path / "out", "-H", f"Authorization: Bearer {HEADER_SECRET}")
        assert ok.returncode == 0, ok.stderr
        assert file_digest(tmp_path / "out").value == digest
        bad = dfget(cluster, f"http://127.0.0.1:99999/x?token={QUERY_SECRET}", tmp_path / "bad")
        assert bad.returncode != 0
        assert QUERY_SECRET not in bad.stderr
    seen = [r for r in origin.request_log() if r.path.startswith("/private.bin")]
    assert seen
    assert all(QUERY_SECRET in r.target for r in seen)
    assert all(r.headers.get("Authorization") == f"Bearer {HEADER_SECRET}" for r in seen)
    logs = sorted((tmp_path / "c").rglob("*.log"))
    assert logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert QUERY_SECRET not in text, f"query token in {log.name}"
        assert HEADER_SECRET not in text, f"Authorization header in {log.name}"
        assert USER_SECRET not in text, f"password of the URL in {log.name}"
    # nor at rest: the seed's and the peer's task records (the database and its write-ahead log)
    databases = sorted((tmp_path / "c").rglob("metadata.db*"))
    assert len({db.parent for db in databases}) == 2
    for db in databases:
        data = db.read_bytes()
        for secret in (QUERY_SECRET, HEADER_SECRET, USER_SECRET):
            assert secret.encode() not in data, f"{secret} in {db}"
