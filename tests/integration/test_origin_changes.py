"""The origin's object changes while a task is half fetched: never a file mixing two versions (issue 4).

Real processes: a scheduler, a seed that is killed at once (so the peer reads the origin itself) and one
peer; a real origin paced so the read takes seconds. The peer's daemon is SIGKILLed mid-read (its
committed pieces survive), the object at the origin is replaced by another of the same length, and the
daemon is restarted. The next dfget must deliver exactly the new object: the held pieces carry the old
ETag, so they are dropped and everything is read again. A crash in the middle of that second read is
resumed with the new object's pieces kept: the task's record took the new ETag.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from clusterkit import dfget_cmd, durable_bytes, stats, wait_until

from dfly.cluster import LocalCluster, Member
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 16 * MiB
ORIGIN_RATE = 4 * MiB
TRICKLE_RATE = 256 * 1024


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www", rate_limit_bytes_per_s=ORIGIN_RATE) as server:
        yield server


def test_object_replaced_between_attempts_is_read_again_whole(origin: Origin, tmp_path: Path) -> None:
    with half_read_then_replaced(origin, tmp_path) as (_, peer, url, new_digest):
        result = subprocess.run(
            dfget_cmd(peer, url, tmp_path / "new"), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert file_digest(tmp_path / "new").value == new_digest
        assert "object changed since its" in peer.log_path.read_text()


def read_half_then_crash(cluster: LocalCluster, origin: Origin, member: Member, url: str, out: Path) -> None:
    """dfget `url` through `member` until half the object is read from the origin and committed, then
    SIGKILL the daemon (the dfget fails). Once the origin has sent 9 MiB it trickles, so the read cannot
    end before the kill however slowly the commit comes (bytes in flight were sent before the trickle)."""
    sent_before = origin.bytes_sent
    dfget = subprocess.Popen(dfget_cmd(member, url, out), stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the origin sent 9 MiB", lambda: origin.bytes_sent - sent_before >= 9 * MiB)
        origin.rate_limit_bytes_per_s = TRICKLE_RATE
        wait_until("half the object committed", lambda: durable_bytes(member, url) >= 8 * MiB)
        cluster.kill_member(member.name)
        dfget.communicate(timeout=30)
    finally:
        origin.rate_limit_bytes_per_s = ORIGIN_RATE
        if dfget.poll() is None:
            dfget.kill()


@contextmanager
def half_read_then_replaced(
    origin: Origin, tmp_path: Path
) -> Iterator[tuple[LocalCluster, Member, str, str]]:
    """A peer (the seed killed, so it reads the origin itself) reads half an object and crashes; the
    object is replaced at the origin (same length, other bytes, a new ETag) and the peer restarted.
    Yields (cluster, peer, url, the new object's digest)."""
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    path = origin.root / "f.bin"
    make_file(path, FILE_BYTES, seed=1)
    url = origin.url("/f.bin")
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        cluster.kill_member("seed")
        peer = cluster.member("peer-1")
        read_half_then_crash(cluster, origin, peer, url, tmp_path / "old")
        new_digest = make_file(path, FILE_BYTES, seed=2)
        later = time.time() + 10
        os.utime(path, (later, later))
        cluster.restart_member(peer.name)
        yield cluster, peer, url, new_digest


def test_a_crash_while_reading_the_changed_object_keeps_its_new_pieces(
    origin: Origin, tmp_path: Path
) -> None:
    """Old object half read, crash; object replaced; restart, the change is found and the new object's
    reading starts, crash again; restart: only the missing half is read, with no second "changed"."""
    with half_read_then_replaced(origin, tmp_path) as (cluster, peer, url, new_digest):
        read_half_then_crash(cluster, origin, peer, url, tmp_path / "new-1")
        assert peer.log_path.read_text().count("object changed since its") == 1
        cluster.restart_member(peer.name)
        result = subprocess.run(
            dfget_cmd(peer, url, tmp_path / "new-2"), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert file_digest(tmp_path / "new-2").value == new_digest
        assert peer.log_path.read_text().count("object changed since its") == 1  # not taken for another
        assert stats(peer)["download_bytes"]["back_to_source"] <= FILE_BYTES - 8 * MiB  # the missing part


def test_a_partial_copy_of_an_object_whose_length_changed_is_dropped_and_fails_nobody(
    tmp_path: Path,
) -> None:
    """peer-1 holds part of an 8 MiB object (its read was cut); the object is replaced by one of 6 MiB.
    peer-1's partial copy has the old layout: it is dropped and the download that found it gets the new
    object (it failed, and only the next one succeeded), and peer-2, asking at the same moment, is not
    failed with it (the stale copy's mismatch was reported as the origin's error, which failed every
    peer of the task)."""
    old, new = os.urandom(8 * MiB), os.urandom(6 * MiB)
    with Origin(tmp_path / "www") as origin, LocalCluster(tmp_path / "c", peers=2) as cluster:
        url = origin.add_bytes("f.bin", old)
        cluster.kill_member("seed")
        peer_1, peer_2 = cluster.member("peer-1"), cluster.member("peer-2")
        cut_then_replaced(origin, peer_1, url, new, tmp_path / "cut")
        on_1 = subprocess.Popen(dfget_cmd(peer_1, url, tmp_path / "one"), stderr=subprocess.PIPE, text=True)
        on_2 = subprocess.Popen(dfget_cmd(peer_2, url, tmp_path / "two"), stderr=subprocess.PIPE, text=True)
        errors_1, errors_2 = on_1.communicate(timeout=60)[1], on_2.communicate(timeout=60)[1]
        assert on_2.returncode == 0, errors_2
        assert (tmp_path / "two").read_bytes() == new
        assert on_1.returncode == 0, errors_1
        assert (tmp_path / "one").read_bytes() == new
        assert "partial copy has another layout" in peer_1.log_path.read_text()


def cut_then_replaced(origin: Origin, member: Member, url: str, new: bytes, out: Path) -> None:
    """A dfget of `url` through `member` whose origin read is cut after 3 MiB (the daemon keeps the
    pieces it got); then the object at `url` is replaced by `new` (a new ETag)."""
    origin.drop_after("/f.bin", 3 * MiB)
    cut = subprocess.run(dfget_cmd(member, url, out), capture_output=True, text=True, timeout=60)
    assert cut.returncode == 1, cut.stderr
    assert "closed the connection" in cut.stderr
    origin.drop_after("/f.bin", None)
    origin.add_bytes("f.bin", new)


@pytest.mark.parametrize("new_mib", [8, 6], ids=["same-length", "other-length"])
def test_a_proxy_client_never_gets_bytes_of_a_held_copy_of_the_old_object(
    tmp_path: Path, new_mib: int
) -> None:
    """peer-1 holds part of the old object; the object is replaced. A forward-proxy client of peer-1 gets
    the new object whole, headers included (the held pieces went out before the origin's answer showed
    them stale, under the old ETag, and the response was then cut short)."""
    old, new = os.urandom(8 * MiB), os.urandom(new_mib * MiB)
    with Origin(tmp_path / "www") as origin:
        overrides = {"peer-1": {"proxy": {"allowed_hosts": [origin.base_url]}}}
        with LocalCluster(tmp_path / "c", peers=1, daemon_overrides=overrides) as cluster:
            url = origin.add_bytes("f.bin", old)
            cluster.kill_member("seed")
            peer_1 = cluster.member("peer-1")
            cut_then_replaced(origin, peer_1, url, new, tmp_path / "cut")
            with urllib.request.urlopen(url, timeout=10) as direct:
                etag = direct.headers["ETag"]
            proxy = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{peer_1.ports['proxy']}"})
            request = urllib.request.Request(url, headers={"X-Dragonfly-Use-P2P": "true"})
            with urllib.request.build_opener(proxy).open(request, timeout=60) as response:
                assert response.headers["X-Dragonfly-Task-ID"]  # it came through P2P
                assert response.headers["ETag"] == etag
                assert response.read() == new
