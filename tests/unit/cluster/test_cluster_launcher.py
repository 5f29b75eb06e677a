"""The launcher against fake child programs: ready files, early exits, timeouts, stopping, cluster.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from dfly.cluster import ClusterError, LocalCluster

FAKE = str(Path(__file__).with_name("fake_member.py"))


def _cluster(tmp_path: Path, sched: str, daemon: str, **kw: float) -> LocalCluster:
    return LocalCluster(
        tmp_path / "c",
        peers=2,
        ready_timeout_s=kw.get("ready_timeout_s", 20.0),
        stop_timeout_s=kw.get("stop_timeout_s", 5.0),
        scheduler_cmd=[sys.executable, FAKE, sched],
        daemon_cmd=[sys.executable, FAKE, daemon],
    )


def test_start_writes_cluster_json_and_stop_ends_all(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, "ok", "ok")
    with cluster:
        desc = json.loads(cluster.cluster_json.read_text())
        procs = desc["processes"]
        assert [p["name"] for p in procs] == ["scheduler", "seed", "peer-1", "peer-2"]
        assert [p["role"] for p in procs] == ["scheduler", "seed", "peer", "peer"]
        assert desc["scheduler_addr"] == "127.0.0.1:9"
        for p in procs:
            assert p["pid"] > 0
            assert p["ports"]
        for p in procs[1:]:
            assert p["socket"].endswith(f"{p['name']}/dfdaemon.sock")
            assert p["proxy_port"] is None
            assert "proxy" not in p["ports"]
            assert p["host_id"] == f"127.0.0.1-dfly-{p['name']}"
        seed_cfg = (cluster.base_dir / "seed.yaml").read_text()
        assert "127.0.0.1:9" in seed_cfg
        assert "--seed" in (cluster.base_dir / "seed.log").read_text()
        assert "--seed" not in (cluster.base_dir / "peer-1.log").read_text()
        members = list(cluster.members)
        assert all(m.alive() for m in members)
    assert all(not m.alive() for m in members)
    assert all(m.process is not None and m.process.returncode == 0 for m in members)
    assert cluster.cluster_json.exists()  # nothing of the user's is removed


def test_a_second_cluster_in_a_running_clusters_dir_fails_and_touches_nothing(tmp_path: Path) -> None:
    with _cluster(tmp_path, "ok", "ok") as first:
        before = {p: p.read_bytes() for p in first.base_dir.glob("*.*") if p.is_file()}
        with pytest.raises(ClusterError, match="in use by another running cluster"):
            _cluster(tmp_path, "ok", "ok").start()
        assert {p: p.read_bytes() for p in first.base_dir.glob("*.*") if p.is_file()} == before
        assert all(m.alive() for m in first.members)
    with _cluster(tmp_path, "ok", "ok") as again:  # free again once the first one stopped
        assert all(m.alive() for m in again.members)


def test_a_cluster_dir_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("")
    with pytest.raises(ClusterError, match="is not a directory"):
        _cluster(tmp_path, "ok", "ok").start()


def test_child_exiting_early_fails_with_its_log(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, "ok", "exit-early")
    with pytest.raises(ClusterError, match=r"exited with code 3.*\n(.*\n)*.*cannot bind the control port"):
        cluster.start()
    assert all(not m.alive() for m in cluster.members)
    assert not cluster.cluster_json.exists()


def test_child_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, "never-ready", "ok", ready_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ClusterError, match="not ready within 1 s: scheduler"):
        cluster.start()
    assert time.monotonic() - started < 10
    assert [m.name for m in cluster.members] == ["scheduler"]
    assert not cluster.members[0].alive()


def test_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, "ok", "ignore-term", stop_timeout_s=0.5)
    cluster.start()
    started = time.monotonic()
    cluster.stop()
    assert time.monotonic() - started < 5
    assert all(not m.alive() for m in cluster.members)
    assert cluster.seed.process is not None
    assert cluster.seed.process.returncode == -9


def test_stop_member_leaves_the_others_running(tmp_path: Path) -> None:
    with _cluster(tmp_path, "ok", "ok") as cluster:
        assert cluster.stop_member("seed") == 0
        assert [m.name for m in cluster.failed_members()] == ["seed"]
        assert all(m.alive() for m in cluster.members if m.name != "seed")


def test_long_socket_path_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    cluster = LocalCluster(
        deep,
        peers=1,
        ready_timeout_s=20.0,
        scheduler_cmd=[sys.executable, FAKE, "ok"],
        daemon_cmd=[sys.executable, FAKE, "ok"],
    )
    with pytest.raises(ClusterError, match="longer than"):
        cluster.start()
    assert all(not m.alive() for m in cluster.members)
