"""A daemon whose listeners are on `::` serves IPv4 and IPv6 alike (configuration.md: "every interface").

Real processes (LocalCluster): peer-1's piece, proxy and health listeners on `::`, the rest as usual on
127.0.0.1. peer-1 advertises 127.0.0.1, so a second peer reaches its piece port over IPv4: with the
seed gone, that peer's download must come from peer-1 and not from the origin.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import dfget_ok, ipv6_loopback, stats

from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

EVERY_INTERFACE = {"ip": "::", "port": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    overrides = {"peer-1": {key: dict(EVERY_INTERFACE) for key in ("piece", "proxy", "health")}}
    with LocalCluster(tmp_path_factory.mktemp("c"), peers=2, daemon_overrides=overrides) as running:
        yield running


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_proxy_and_health_on_every_interface_answer_ipv4_and_ipv6(cluster: LocalCluster, host: str) -> None:
    if host == "[::1]" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    ports = cluster.peers[0].ports
    with urllib.request.urlopen(f"http://{host}:{ports['health']}/healthy", timeout=10) as resp:
        assert resp.status == 200
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://{host}:{ports['proxy']}/v2/", timeout=10) as resp:
        assert resp.status == 200  # the mirror's ping, answered by the daemon itself


def test_piece_port_on_every_interface_serves_an_ipv4_peer(cluster: LocalCluster, tmp_path: Path) -> None:
    holder, fetcher = cluster.peers
    with Origin(tmp_path / "www") as origin:
        assert origin.root is not None
        digest = make_file(origin.root / "f.bin", 8 * MiB, seed=11)
        url = origin.url("/f.bin")
        dfget_ok(holder, url, tmp_path / "held")
        cluster.kill_member("seed")
        uploaded_before = int(stats(holder)["upload_bytes"])
        sent_before = origin.bytes_sent
        dfget_ok(fetcher, url, tmp_path / "fetched")
        assert file_digest(tmp_path / "fetched").value == digest
        assert origin.bytes_sent == sent_before  # not read again: peer-1 served it over IPv4
        assert int(stats(holder)["upload_bytes"]) - uploaded_before >= 8 * MiB
