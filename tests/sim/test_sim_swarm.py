"""Whole simulated swarms through the real scheduler engine and download planner."""

from __future__ import annotations

import pytest
from sim_swarmkit import scenario

from dfly.sim.model import DaemonSettings
from dfly.sim.report import percentile, summarize
from dfly.sim.swarm import Swarm, run_swarm


def test_small_swarm_completes_with_one_origin_copy_and_never_beats_the_bound() -> None:
    config = scenario(6, 16, 100)
    result = run_swarm(config)
    assert result.failed == 0
    assert result.engine_errors == 0, result.first_error
    assert len(result.host_times) == 6
    assert result.origin_bytes / config.file_bytes == pytest.approx(1.0, abs=0.01)
    # Physics: no host can finish before F / R of its own downlink.
    assert min(result.host_times) >= config.bound_s() * 0.999
    # Every byte a host received came from the origin (the seed) or another host.
    received = sum(result.piece_bytes.values())
    assert received == pytest.approx(7 * config.file_bytes)  # 6 hosts and the seed


def test_same_seed_same_result_other_seed_other_result() -> None:
    first = run_swarm(scenario(12, 8, 100, seed=3))
    second = run_swarm(scenario(12, 8, 100, seed=3))
    third = run_swarm(scenario(12, 8, 100, seed=4))
    assert first.host_times == second.host_times
    assert first.events == second.events
    assert first.seed_upload_bytes == second.seed_upload_bytes
    assert third.host_times != first.host_times


def test_layers_are_separate_tasks_each_read_once() -> None:
    config = scenario(8, 16, 100, layers=2)
    result = run_swarm(config)
    assert result.failed == 0
    assert len(result.host_times) == 8
    assert result.origin_bytes / config.file_bytes == pytest.approx(1.0, abs=0.01)
    assert result.piece_length == 256 << 10  # the daemon's rule for an 8 MiB layer


@pytest.mark.parametrize("topology", ["mesh", "dag"])
def test_both_topologies_complete(topology: str) -> None:
    config = scenario(20, 8, 100, topology=topology)
    result = run_swarm(config)
    assert result.failed == 0, result.failures
    assert len(result.host_times) == 20
    assert result.origin_bytes / config.file_bytes <= 1.05


def test_churn_run_completes_for_the_hosts_that_stay() -> None:
    config = scenario(40, 16, 100, churn=0.1, seed=1)
    result = run_swarm(config)
    assert result.left == 4
    assert result.failed == 0, result.failures
    assert len(result.host_times) == 36
    assert result.engine_errors == 0, result.first_error
    assert result.origin_bytes / config.file_bytes <= 1.1


def test_a_user_piece_length_is_used() -> None:
    config = scenario(4, 8, 100, piece_length=1 << 20)
    result = run_swarm(config)
    assert result.piece_length == 1 << 20
    assert result.failed == 0


def test_summary_figures_follow_the_host_times() -> None:
    result = run_swarm(scenario(10, 8, 100))
    out = summarize(result)
    bound = result.config.bound_s()
    assert out["p95_s"] == pytest.approx(percentile(result.host_times, 95), abs=1e-4)
    assert out["p99_over_bound"] == pytest.approx(percentile(result.host_times, 99) / bound, abs=1e-4)
    assert out["max_s"] == pytest.approx(max(result.host_times), abs=1e-4)
    assert out["completed"] == 10
    assert out["calibrated"] is False
    assert out["scheduler_cpu_s_per_sim_s"] > 0


def test_percentile_interpolates_linearly() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_the_first_pass_gate_spares_the_seed_uplink() -> None:
    gated = run_swarm(scenario(8, 16, 100, daemon=DaemonSettings(first_pass=True)))
    open_ = run_swarm(scenario(8, 16, 100, daemon=DaemonSettings(first_pass=False)))
    assert gated.failed == open_.failed == 0
    assert gated.seed_upload_bytes < open_.seed_upload_bytes
    assert gated.seed_upload_bytes / gated.config.file_bytes < 1.5


def test_fewer_upload_slots_than_children_still_completes() -> None:
    result = run_swarm(scenario(12, 8, 100, daemon=DaemonSettings(upload_slots=2)))
    assert result.failed == 0, result.failures
    assert len(result.host_times) == 12


def test_idc_and_location_labels_reach_the_engine_and_cross_idc_latency_costs_time() -> None:
    swarm = Swarm(scenario(8, 4, 100, idcs=2))
    near = swarm.run()
    labels = {host.info.idc for host in swarm.scheduler.engine.cluster.hosts.values() if not host.info.seed}
    assert labels == {"idc0", "idc1"}
    assert all(h.info.location.endswith(h.info.idc) for h in swarm.scheduler.engine.cluster.hosts.values())
    far = run_swarm(scenario(8, 4, 100, idcs=2, idc_latency_s=0.05))
    assert near.failed == far.failed == 0
    assert max(far.host_times) > max(near.host_times)
