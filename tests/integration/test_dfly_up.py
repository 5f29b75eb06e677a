"""`dfly up --peers 2` as a real subprocess: cluster.json, live members, health endpoints, a clean stop on
SIGTERM and on SIGHUP."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _still_running(pids: list[int], within_s: float) -> list[int]:
    """The members (not this test's children: no waitpid) still running after `within_s`, each waited
    for on its pidfd, which becomes readable when the process exits."""
    deadline = time.monotonic() + within_s
    running = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                running.append(pid)
        finally:
            os.close(fd)
    return running


def _reap(proc: subprocess.Popen[bytes], pids: list[int]) -> None:
    """Whatever a failed test left running: `dfly up` and its members."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_for_cluster_json(proc: subprocess.Popen[bytes], path: Path) -> dict[str, object]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"dfly up exited with {proc.returncode} before cluster.json:\n{out[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path} within {READY_TIMEOUT_S:g} s")
        time.sleep(0.1)
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.timeout(READY_TIMEOUT_S + STOP_TIMEOUT_S + 30)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal closed
def test_dfly_up_two_peers(tmp_path: Path, stop: signal.Signals) -> None:
    cluster_dir = tmp_path / "c"
    argv = ["up", "--peers", "2", "--dir", str(cluster_dir), "--registry-mirror", "127.0.0.1:5999"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfly.cli.dfly", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pids: list[int] = []
    try:
        desc = _wait_for_cluster_json(proc, cluster_dir / "cluster.json")
        processes = desc["processes"]
        assert isinstance(processes, list)
        assert sorted(p["role"] for p in processes) == ["peer", "peer", "scheduler", "seed"]
        for p in processes:
            pids.append(p["pid"])
            assert _alive(p["pid"]), p
            assert p["ports"], p
            assert all(isinstance(v, int) and v > 0 for v in p["ports"].values()), p
            if p["role"] == "scheduler":
                assert "grpc" in p["ports"]
                continue
            assert Path(p["socket"]).exists(), p
            # the registry mirror runs and passes its ping to --registry-mirror (nothing listens there)
            mirror = f"http://127.0.0.1:{p['proxy_port']}/v2/"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(mirror, timeout=5)
            assert refused.value.code == 502, mirror
            assert refused.value.headers["X-Dragonfly-Error-Type"] == "origin"
            assert "127.0.0.1:5999" in refused.value.read().decode()
            assert p["host_id"]
            url = f"http://127.0.0.1:{p['ports']['health']}/healthy"
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200, url
        configs = [Path(p["config"]).read_text() for p in processes if p["role"] != "scheduler"]
        assert all("registry_mirror: 127.0.0.1:5999" in text for text in configs)
        hostnames = {p["host_id"] for p in processes if p["role"] != "scheduler"}
        assert len(hostnames) == 3
        proc.send_signal(stop)  # SIGHUP killed `dfly up` and left its members running
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
        assert _still_running(pids, within_s=5.0) == []
        assert (cluster_dir / "cluster.json").exists()
    finally:
        _reap(proc, pids)


@pytest.mark.timeout(READY_TIMEOUT_S + STOP_TIMEOUT_S + 30)
def test_dfly_up_stops_its_cluster_after_its_terminal_hung_up(tmp_path: Path) -> None:
    """A closed terminal sends SIGHUP and fails every later write with EIO: the "stopping" line raised,
    the stop was skipped, and the members (own process groups: no SIGHUP of their own) kept running."""
    cluster_dir = tmp_path / "c"
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfly.cli.dfly", "up", "--peers", "1", "--dir", str(cluster_dir)],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    pids: list[int] = []
    try:
        desc = _wait_for_cluster_json(proc, cluster_dir / "cluster.json")
        processes = desc["processes"]
        assert isinstance(processes, list)
        pids = [p["pid"] for p in processes]
        shown = b""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"seed" not in shown and time.monotonic() < deadline:  # the table is on the terminal
            if select.select([master], [], [], 1.0)[0]:
                shown += os.read(master, 65536)
        assert b"seed" in shown, shown
        os.close(master)  # the terminal is gone: writes to it now fail with EIO
        master = -1
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
        assert _still_running(pids, within_s=5.0) == []
    finally:
        if master >= 0:
            os.close(master)
        _reap(proc, pids)
