"""Config generation of the local cluster: kernel-chosen ports, distinct identities, seed and trust."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from dfly.cluster import LOOPBACK, ClusterError, daemon_config, query_stats, scheduler_config
from dfly.daemon.config import DaemonConfig
from dfly.scheduler.config import SchedulerConfig


def test_scheduler_listeners_are_loopback_port_zero() -> None:
    cfg = SchedulerConfig.model_validate(scheduler_config("debug"))
    assert (cfg.listen_ip, cfg.port) == (LOOPBACK, 0)
    assert (cfg.metrics.ip, cfg.metrics.port) == (LOOPBACK, 0)
    assert cfg.log_level == "debug"


@pytest.mark.parametrize("seed", [True, False])
def test_daemon_config_validates_and_uses_port_zero(tmp_path: Path, seed: bool) -> None:
    raw = daemon_config("peer-1", tmp_path, "127.0.0.1:41000", seed=seed, upload_limit_bytes_per_s=5)
    cfg = DaemonConfig.model_validate(raw)
    listeners = [cfg.control, cfg.piece, cfg.proxy, cfg.metrics, cfg.health]
    assert all(listener.port == 0 for listener in listeners)
    assert all(listener.ip == LOOPBACK for listener in listeners)
    assert cfg.scheduler.addrs == ["127.0.0.1:41000"]
    assert cfg.control.trusted_schedulers == [LOOPBACK]
    assert cfg.host.advertise_ip == LOOPBACK
    assert cfg.seed_peer.enable is seed
    assert cfg.upload.rate_limit_bytes_per_s == 5
    assert cfg.storage.dir == tmp_path / "peer-1" / "data"
    assert cfg.local_api.socket == tmp_path / "peer-1" / "dfdaemon.sock"


def test_daemon_identities_are_distinct(tmp_path: Path) -> None:
    names = ["seed", "peer-1", "peer-2", "peer-3"]
    cfgs = [daemon_config(n, tmp_path, "127.0.0.1:1", seed=n == "seed") for n in names]
    for key in (("host", "hostname"), ("storage", "dir"), ("local_api", "socket")):
        values = {c[key[0]][key[1]] for c in cfgs}
        assert len(values) == len(names), key
    assert cfgs[0]["host"]["hostname"] == "dfly-seed"
    assert cfgs[1]["host"]["hostname"] == "dfly-peer-1"
    assert [c["seed_peer"]["enable"] for c in cfgs] == [True, False, False, False]


def _serve_once(path: Path, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                assert conn.recv(1024) == b'{"op": "stats"}\n'
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_query_stats_unwraps_the_stats_event(tmp_path: Path) -> None:
    counters = {"download_bytes": {"back_to_source": 1, "remote_seed": 2, "remote_peer": 3, "local_peer": 0}}
    sock = tmp_path / "s.sock"
    thread = _serve_once(sock, json.dumps({"event": "stats", "stats": counters}).encode() + b"\n")
    assert query_stats(sock) == counters
    thread.join(5)


def test_query_stats_error_event_raises(tmp_path: Path) -> None:
    sock = tmp_path / "e.sock"
    thread = _serve_once(sock, b'{"event": "error", "kind": "usage", "message": "no"}\n')
    with pytest.raises(ClusterError):
        query_stats(sock)
    thread.join(5)


def test_a_seed_cannot_be_a_leech(tmp_path: Path) -> None:
    cfg = daemon_config("seed", tmp_path, "127.0.0.1:8002", seed=True)
    cfg["upload"]["disable_shared"] = True
    with pytest.raises(ValueError, match="seed peer must upload"):
        DaemonConfig.model_validate(cfg)
    cfg["seed_peer"]["enable"] = False
    assert DaemonConfig.model_validate(cfg).upload.disable_shared


@pytest.mark.parametrize("addrs", [[], ["127.0.0.1"], [":8002"], ["host:port"]])
def test_scheduler_addresses_are_checked_at_load(addrs: list[str]) -> None:
    """An empty list or a malformed address is a config error (dfdaemon prints it in one line)."""
    with pytest.raises(ValidationError, match="scheduler address"):
        DaemonConfig.model_validate({"scheduler": {"addrs": addrs}})


@pytest.mark.parametrize("mode", [-5, 0o1000])
def test_the_local_api_socket_mode_is_permission_bits(mode: int) -> None:
    with pytest.raises(ValidationError, match=r"local_api\.mode"):
        DaemonConfig.model_validate({"local_api": {"mode": mode}})
