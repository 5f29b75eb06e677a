"""Model pieces: the peer state machine, IndexedSet sampling, config loading, purity of the engine."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scheduler_testkit import Harness, of_type

from dfly.common.errors import ConfigError
from dfly.scheduler.app import main
from dfly.scheduler.config import SchedulerConfig, load_scheduler_config
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.messages import PeerFinished, SendCandidateParents
from dfly.scheduler.core.model import PEER_TRANSITIONS, IndexedSet, InvalidTransition, Peer, PeerState


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ([PeerState.RECEIVED, PeerState.RUNNING, PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED], True),
        ([PeerState.RECEIVED, PeerState.BACK_TO_SOURCE, PeerState.FAILED], True),
        ([PeerState.RECEIVED, PeerState.RUNNING, PeerState.LEAVE], True),
        ([PeerState.RUNNING], False),  # PENDING must be received first
        ([PeerState.RECEIVED, PeerState.SUCCEEDED, PeerState.RUNNING], False),
        ([PeerState.RECEIVED, PeerState.FAILED, PeerState.SUCCEEDED], False),
    ],
)
def test_peer_state_machine(path: list[PeerState], allowed: bool) -> None:
    peer = Peer("p", "t", "h")
    if allowed:
        for state in path:
            peer.move_to(state)
        assert peer.state is path[-1]
    else:
        for state in path[:-1]:
            peer.move_to(state)
        with pytest.raises(InvalidTransition):
            peer.move_to(path[-1])


def test_leave_is_final() -> None:
    assert PEER_TRANSITIONS[PeerState.LEAVE] == frozenset()


def test_indexed_set_adds_removes_and_samples_without_duplicates() -> None:
    items = IndexedSet()
    for i in range(10):
        items.add(f"p{i}")
    items.add("p3")
    items.discard("p0")
    items.discard("p9")
    items.discard("missing")
    assert len(items) == 8
    assert "p0" not in items
    assert "p5" in items
    rng = random.Random(1)
    sample = items.sample(rng, 5)
    assert len(sample) == len(set(sample)) == 5
    assert set(items.sample(rng, 100)) == {f"p{i}" for i in range(1, 9)}


def test_engine_config_defaults() -> None:
    config = EngineConfig()
    assert (config.candidate_parent_limit, config.filter_parent_limit) == (5, 15)
    assert (config.retry_limit, config.retry_back_to_source_limit, config.retry_interval_s) == (5, 4, 0.5)
    assert (config.back_to_source_limit, config.seed_failure_ttl_s, config.topology) == (1, 1800, "mesh")


def test_scheduler_config_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.yaml"
    path.write_text("port: 0\nscheduling:\n  topology: dag\n  weights: {load: 0.5, idc: 0.5}\n")
    config = load_scheduler_config(path, environ={"DFLY_SCHEDULER__METRICS__PORT": "0"})
    assert isinstance(config, SchedulerConfig)
    assert (config.port, config.metrics.port, config.scheduling.topology) == (0, 0, "dag")
    assert config.scheduling.weights.load == 0.5
    assert config.scheduling.weights.host_type == 0.1


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port: 70000\n", "port"),
        ("scheduling: {topology: ring}\n", "scheduling.topology"),
        ("colour: red\n", "colour"),
        ("log_level: verbose\n", "log_level"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "scheduler.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"invalid config key {key}"):
        load_scheduler_config(path, environ={})


def test_main_reports_a_bad_config_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "scheduler.yaml"
    path.write_text("port: -1\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "invalid config key port" in err


def test_engine_reads_no_clock_and_no_global_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> float:
        raise AssertionError("the engine must not read a clock or global randomness")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, forbidden)
    for name in ("random", "randrange", "sample", "shuffle", "choice"):
        monkeypatch.setattr(random, name, forbidden)
    harness = Harness()
    for name in ("seed", "a", "b", "c"):
        harness.announce(name, seed=name == "seed")
    harness.register("peer-a", "a")
    harness.register("peer-b", "b")
    harness.register("seed-peer", "seed", need_back_to_source=True)
    answers = of_type(harness.start_origin("seed-peer"), SendCandidateParents)
    harness.pieces("peer-a", 0, parent="seed-peer")
    harness.register("peer-c", "c")
    harness.advance(5)
    harness.do(PeerFinished("seed-peer", (1, 2, 3, 4)))
    assert len(answers) == 2


@pytest.mark.parametrize(
    ("which", "key"), [("grpc", "listen_ip / port"), ("metrics", "metrics.ip / metrics.port")]
)
def test_main_reports_a_taken_port_in_one_line_naming_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, key: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        grpc_port, metrics_port = (port, 0) if which == "grpc" else (0, port)
        path = tmp_path / "scheduler.yaml"
        metrics = f"metrics: {{ip: 127.0.0.1, port: {metrics_port}}}"
        path.write_text(f"listen_ip: 127.0.0.1\nport: {grpc_port}\n{metrics}\n")
        assert main(["--config", str(path)]) == 2  # a config error, as the daemon's
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"dfly scheduler: {key}: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_an_address_not_on_this_host_is_one_line_without_grpc_cores_log(tmp_path: Path) -> None:
    """Port 0 included: before, gRPC core printed its own `add_port.cc` error line first."""
    path = tmp_path / "scheduler.yaml"
    path.write_text("listen_ip: 192.0.2.1\nport: 0\nmetrics: {port: 0}\n")  # TEST-NET-1: on no host here
    command = [sys.executable, "-m", "dfly.cli.dfly", "scheduler", "--config", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dfly scheduler: listen_ip / port: cannot listen on 192.0.2.1:0: Cannot assign requested address"
    ]


@pytest.mark.parametrize(
    ("where", "message"), [("missing/ready.json", "does not exist"), (".", "is a directory")]
)
def test_a_ready_file_that_could_never_be_written_is_refused_before_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, message: str
) -> None:
    """It was found once the scheduler served (exit 1); dfdaemon refuses it at start (exit 2)."""
    assert main(["--port", "0", "--ready-file", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfly scheduler: --ready-file ")
    assert message in err
    assert "serving" not in err
