"""The P2P core end to end: real scheduler, seed and peers (LocalCluster) and a real origin on 127.0.0.1.

One cluster per module (1 seed with a 50 MiB/s upload limit + 3 peers); tests run in file order and use
distinct files, so each checks its own task.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import Downloads, dfget_cmd, finished_durably, wait_until

from dfly.cluster import LocalCluster, Member, query_stats
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB, default_piece_length
from dfly.daemon.config import DownloadSection
from dfly.daemon.task_request import TaskRequest
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.client import RemoteError, connect_parent
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 64 * MiB
SEED_UPLOAD_LIMIT = 50 * MiB
DFGET_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    root = tmp_path_factory.mktemp("www")
    with Origin(root) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("c"))
    with LocalCluster(base, peers=3, seed_upload_limit_bytes_per_s=SEED_UPLOAD_LIMIT) as running:
        yield running


def publish(origin: Origin, name: str, size: int, seed: int) -> tuple[str, str]:
    assert origin.root is not None
    digest = make_file(origin.root / name, size, seed=seed)
    return origin.url(f"/{name}"), digest


def dfget(member: Member, url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        dfget_cmd(member, url, out, *extra),
        capture_output=True,
        text=True,
        timeout=DFGET_TIMEOUT_S,
        check=False,
    )


def dfget_at_once(peers: list[Member], url: str, digest: str, out_dir: Path) -> None:
    """dfget on every peer at the same time; each must succeed with the expected bytes."""
    with Downloads() as downloads:  # any dfget still running when this fails is killed
        for peer in peers:
            downloads.start(peer, url, out_dir / f"out-{peer.name}")
        downloads.finish(DFGET_TIMEOUT_S)
    for peer in peers:
        assert file_digest(out_dir / f"out-{peer.name}").value == digest


def network_bytes(stats: dict[str, object]) -> int:
    downloaded = stats["download_bytes"]
    assert isinstance(downloaded, dict)
    return int(downloaded["back_to_source"]) + int(downloaded["remote_seed"]) + int(downloaded["remote_peer"])


def test_swarm_of_three_peers_shares_one_origin_copy(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    url, digest = publish(origin, "swarm.bin", FILE_BYTES, seed=1)
    before = origin.bytes_sent
    dfget_at_once(cluster.peers, url, digest, tmp_path)

    origin_copies = (origin.bytes_sent - before) / FILE_BYTES
    assert 1.0 <= origin_copies <= 1.1

    seed_stats = query_stats(cluster.seed.socket or "")
    peer_stats = [query_stats(peer.socket or "") for peer in cluster.peers]
    # The seed's first pass gives each piece out once (upload.first_pass), then it is released: about
    # one copy leaves the seed, the peers trade the rest. Its log says the gate ran for this task:
    # without the gate the seed sent ~1.1 copies, too close to the 1.00-1.05 measured with it for a
    # byte bound alone to tell them apart on a loaded machine (CI saw 1.051 once).
    task_id = TaskRequest(url=url).task_id
    assert f"task {task_id[:12]}: first pass done, all pieces given out" in cluster.seed.log_path.read_text()
    assert FILE_BYTES <= seed_stats["upload_bytes"] <= 1.15 * FILE_BYTES
    assert sum(s["upload_bytes"] for s in peer_stats) >= 1.0 * FILE_BYTES
    uploaded = seed_stats["upload_bytes"] + sum(s["upload_bytes"] for s in peer_stats)
    received = sum(
        s["download_bytes"]["remote_seed"] + s["download_bytes"]["remote_peer"] for s in peer_stats
    )
    # Every received byte was uploaded; the surplus is endgame duplicates a CANCEL reached too late: at
    # most one per request in flight when the endgame starts (parents x requests per parent, per peer).
    parents_per_peer = len(cluster.daemons) - 1
    in_flight_at_endgame = len(cluster.peers) * parents_per_peer * DownloadSection().requests_per_parent
    assert 0 <= uploaded - received <= in_flight_at_endgame * default_piece_length(FILE_BYTES)
    for stats in peer_stats:
        assert stats["download_bytes"]["back_to_source"] == 0
        assert network_bytes(stats) == FILE_BYTES
    # every piece from a parent was reported with its cost (the scheduler's bad-parent detection)
    pieces_from_parents = len(cluster.peers) * (FILE_BYTES // default_piece_length(FILE_BYTES))
    assert scheduler_metric(cluster, "dfly_scheduler_piece_cost_seconds_count") == pieces_from_parents


def scheduler_metric(cluster: LocalCluster, name: str) -> float:
    url = f"http://127.0.0.1:{cluster.scheduler.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_second_download_reads_nothing_from_the_network(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    url, digest = publish(origin, "again.bin", 8 * MiB, seed=2)
    peer = cluster.peers[0]
    assert dfget(peer, url, tmp_path / "first").returncode == 0
    stats_before = query_stats(peer.socket or "")
    origin_before = origin.bytes_sent
    result = dfget(peer, url, tmp_path / "second")
    assert result.returncode == 0, result.stderr
    assert file_digest(tmp_path / "second").value == digest
    stats_after = query_stats(peer.socket or "")
    assert network_bytes(stats_after) == network_bytes(stats_before)
    assert origin.bytes_sent == origin_before


def test_editing_the_output_does_not_change_the_cache(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    url, digest = publish(origin, "edit.bin", 4 * MiB, seed=3)
    peer = cluster.peers[1]
    out = tmp_path / "edit"
    assert dfget(peer, url, out).returncode == 0
    with open(out, "r+b") as f:
        f.write(b"scribbled over by the user")
    assert dfget(peer, url, tmp_path / "fresh").returncode == 0
    assert file_digest(tmp_path / "fresh").value == digest
    other = cluster.peers[2]  # and other peers get the original bytes from this cache
    assert dfget(other, url, tmp_path / "other").returncode == 0
    assert file_digest(tmp_path / "other").value == digest


def test_daemon_killed_and_restarted_still_serves_its_finished_task(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    url, digest = publish(origin, "survivor.bin", 16 * MiB, seed=4)
    holder, fetcher = cluster.peers[0], cluster.peers[1]
    assert dfget(holder, url, tmp_path / "held").returncode == 0
    # dfget is answered before the group commit: a SIGKILL before it may rightly lose the task
    wait_until("the holder's copy committed", lambda: finished_durably(holder, url))
    cluster.kill_member(holder.name)
    cluster.restart_member(holder.name)
    result = dfget(holder, url, tmp_path / "after-restart")
    assert result.returncode == 0, result.stderr
    assert file_digest(tmp_path / "after-restart").value == digest
    # From its own recovered cache: a restarted daemon that forgot the task would fetch it again.
    after_restart = query_stats(holder.socket or "")
    assert network_bytes(after_restart) == 0
    assert after_restart["download_bytes"]["local_peer"] == 16 * MiB
    # Another peer can get it from the restarted holder (or the seed): never from the origin again.
    origin_before = origin.bytes_sent
    result = dfget(fetcher, url, tmp_path / "from-swarm")
    assert result.returncode == 0, result.stderr
    assert file_digest(tmp_path / "from-swarm").value == digest
    assert origin.bytes_sent == origin_before


def test_origin_404_fails_with_the_status_and_leaves_no_file(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "missing"
    result = dfget(cluster.peers[2], origin.url("/no-such-file"), out)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "404" in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unreachable_daemon_names_the_socket(origin: Origin, tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    cmd = [
        sys.executable,
        "-m",
        "dfly.cli.dfget",
        "-e",
        str(sock),
        origin.url("/x"),
        "-O",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert str(sock) in result.stderr
    assert not (tmp_path / "o").exists()


def test_dfget_options_reach_the_task_and_the_origin(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    url, digest = publish(origin, "options.bin", 3 * MiB, seed=5)
    peer = cluster.peers[0]
    signed = f"{url}?token=one&v=1"
    result = dfget(
        peer,
        signed,
        tmp_path / "a",
        "--filtered-query-param",
        "token",
        "--piece-length",
        "1MiB",
        "--tag",
        "t1",
        "-H",
        "X-Test-Header: hello",
        "--digest",
        f"sha256:{digest}",
    )
    assert result.returncode == 0, result.stderr
    assert file_digest(tmp_path / "a").value == digest
    requests = [r for r in origin.request_log() if r.path.startswith("/options.bin")]
    assert requests
    assert all(r.headers.get("X-Test-Header") == "hello" for r in requests)
    assert all("Range" in r.headers for r in requests)  # stat with Range 0-0, then one ranged stream
    fetched = origin.bytes_sent
    # The same object under another token is the same task (the filter extends the defaults): no origin read.
    again = dfget(
        peer,
        f"{url}?token=two&v=1",
        tmp_path / "b",
        "--filtered-query-param",
        "token",
        "--piece-length",
        "1MiB",
        "--tag",
        "t1",
    )
    assert again.returncode == 0, again.stderr
    assert origin.bytes_sent == fetched
    # Another tag is another task: read from the origin once more.
    other = dfget(peer, signed, tmp_path / "c", "--filtered-query-param", "token", "--piece-length", "1MiB")
    assert other.returncode == 0, other.stderr
    assert origin.bytes_sent > fetched


def test_wrong_digest_fails_and_leaves_nothing(cluster: LocalCluster, origin: Origin, tmp_path: Path) -> None:
    url, _ = publish(origin, "digest.bin", 1 * MiB, seed=6)
    result = dfget(cluster.peers[1], url, tmp_path / "out", "--digest", "sha256:" + "0" * 64)
    assert result.returncode == 1
    assert "digest mismatch" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_two_dfgets_on_one_peer_share_one_download(cluster: LocalCluster, tmp_path: Path) -> None:
    """The second dfget starts while the first one's download runs (a slow origin makes it take ~2 s)
    and attaches to it: the peer fetches the file once."""
    with Origin(tmp_path / "slow", rate_limit_bytes_per_s=8 * MiB) as slow:
        url, digest = publish(slow, "shared.bin", 16 * MiB, seed=7)
        peer = cluster.peers[2]
        before = network_bytes(query_stats(peer.socket or ""))

        def fetched() -> int:
            return network_bytes(query_stats(peer.socket or "")) - before

        with Downloads() as downloads:
            downloads.start(peer, url, tmp_path / "out-0")
            wait_until("the first download under way", lambda: fetched() > 0)
            downloads.start(peer, url, tmp_path / "out-1")
            assert fetched() < 8 * MiB  # so the second dfget comes while the download runs
            downloads.finish(DFGET_TIMEOUT_S)
    for i in range(2):
        assert file_digest(tmp_path / f"out-{i}").value == digest
    assert fetched() == 16 * MiB  # one live task, fetched once


class _Silent:
    """A ParentListener that expects nothing."""

    def on_have(self, parent_id: str, pieces: list[int]) -> None: ...
    def on_piece(self, parent_id: str, number: int, offset: int, data: memoryview, digest: int) -> None: ...
    def on_piece_failed(self, parent_id: str, number: int, reason: str) -> None: ...
    def on_closed(self, parent_id: str, error: Exception | None) -> None: ...


@pytest.mark.parametrize("task_id", ["../../../../etc/passwd", "/etc/passwd", "a" * 64, "%2e%2e%2fetc"])
def test_piece_port_serves_tasks_by_id_never_a_path(cluster: LocalCluster, task_id: str) -> None:
    """A real daemon's piece port asked for a path, or a task it does not hold: a clean refusal."""
    peer = cluster.peers[0]

    async def ask() -> str:
        try:
            conn = await connect_parent(
                "127.0.0.1", peer.ports["piece"], task_id=task_id, peer_id="probe", piece_length=MiB,
                content_length=MiB, parent_id="x", listener=_Silent(), pool=BufferPool(2 * MiB),
            )  # fmt: skip
        except RemoteError as exc:
            return exc.code
        conn.close()
        return "served"

    assert asyncio.run(ask()) == "unknown_task"
    assert peer.alive()


def test_metrics_ports_answer_only_at_the_metrics_path(cluster: LocalCluster) -> None:
    """A probe or scrape config with a wrong path gets 404 from a real daemon and scheduler."""
    for member in (cluster.scheduler, cluster.peers[0]):
        base = f"http://127.0.0.1:{member.ports['metrics']}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert response.status == 200
        for path in ("/", "/healthy"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{base}{path}", timeout=5)
            assert info.value.code == 404, (member.name, path)


def test_a_download_without_any_query_filter_is_served_by_the_seed(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    """`--no-default-filters`: the signing parameters are part of the task. The seed took its empty
    filter list for the default one, fetched another task, and the peer waited for a parent in vain
    (with back-to-source disabled: failed after ~12 s; else every peer read the origin itself)."""
    _, digest = publish(origin, "unfiltered.bin", 2 * MiB, seed=3)
    url = origin.url("/unfiltered.bin?X-Amz-Signature=abc")
    peer = cluster.peers[1]
    result = dfget(peer, url, tmp_path / "out", "--no-default-filters", "--disable-back-to-source")
    assert result.returncode == 0, result.stderr
    assert file_digest(tmp_path / "out").value == digest
    assert "differs from" not in cluster.member("seed").log_path.read_text()


def test_without_the_seed_one_peer_reads_the_origin_for_the_others(
    cluster: LocalCluster, origin: Origin, tmp_path: Path
) -> None:
    """Runs last: it stops the seed. The scheduler sees the seed's keepalive drop and sends one peer
    to the origin; the others get the file from it."""
    cluster.kill_member("seed")
    url, digest = publish(origin, "seedless.bin", 8 * MiB, seed=8)
    before = origin.bytes_sent
    dfget_at_once(cluster.peers, url, digest, tmp_path)
    assert (origin.bytes_sent - before) / (8 * MiB) <= 1.1
