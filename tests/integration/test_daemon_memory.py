"""A long-running daemon does not keep what a finished download used: the attempt of a completed task
(its parents, their connections and receive buffers) is let go, and a failed task that stored nothing
(an origin 404) is forgotten once its requester has heard the outcome. Measured on a real daemon
process: its task count and its resident memory per download after a warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from clusterkit import stats

from dfly.cli.dfget import download, parse_args
from dfly.cluster import LocalCluster, Member
from dfly.common.errors import DflyError
from dfly.devtools.origin import Origin

pytestmark = pytest.mark.integration

WARM_UP = 40
MEASURED = 200
FAILING = 100
SIZE = 4096
# Before the attempt was let go each download kept ~150 KB on a peer (its parent connection's 128 KiB
# receive buffer among it); what is left per task now is its state and records, a few KB.
MAX_GROWTH_PER_TASK = 40 * 1024


def rss_bytes(member: Member) -> int:
    for line in Path(f"/proc/{member.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fetch(member: Member, url: str, out: Path) -> None:
    assert member.socket is not None
    download(parse_args(["-e", str(member.socket), "--no-progress", "--overwrite", url, "-O", str(out)]))


def test_finished_and_failed_downloads_leave_nothing_behind(tmp_path: Path) -> None:
    with Origin() as origin, LocalCluster(tmp_path / "c", peers=1) as cluster:
        peer = cluster.member("peer-1")
        urls = [
            origin.add_bytes(f"f{n}", n.to_bytes(4, "big") * (SIZE // 4)) for n in range(WARM_UP + MEASURED)
        ]
        out = tmp_path / "out"
        for url in urls[:WARM_UP]:
            fetch(peer, url, out)
        before = rss_bytes(peer)
        for url in urls[WARM_UP:]:
            fetch(peer, url, out)
        growth = (rss_bytes(peer) - before) / MEASURED
        assert growth < MAX_GROWTH_PER_TASK, f"{growth:.0f} bytes per finished task"

        for n in range(FAILING):
            with pytest.raises(DflyError, match="404"):
                fetch(peer, origin.url(f"missing-{n}"), out)
        assert stats(peer)["tasks"] == WARM_UP + MEASURED  # the failed ones are forgotten
        assert stats(cluster.member("seed"))["tasks"] == WARM_UP + MEASURED
