"""PieceCosts: Dragonfly's bad-parent rule on the costs of the pieces a parent served."""

from __future__ import annotations

import random
import statistics

import pytest

from dfly.scheduler.core.costs import FEW_SAMPLES_FACTOR, WINDOW, PieceCosts


def record_all(costs: PieceCosts, values: list[float]) -> PieceCosts:
    for value in values:
        costs.record(value)
    return costs


def test_two_samples_are_needed_before_anything_is_bad() -> None:
    assert not record_all(PieceCosts(), [0.01, 100.0]).bad
    assert record_all(PieceCosts(), [0.01, 0.01, 100.0]).bad


@pytest.mark.parametrize(
    ("factor", "bad"), [(FEW_SAMPLES_FACTOR * 0.99, False), (FEW_SAMPLES_FACTOR * 1.01, True)]
)
def test_few_samples_use_twenty_times_the_mean(factor: float, bad: bool) -> None:
    history = [0.1, 0.3, 0.2]
    assert record_all(PieceCosts(), [*history, factor * statistics.mean(history)]).bad is bad


def test_a_good_piece_clears_the_flag_and_unmeasured_costs_are_ignored() -> None:
    costs = record_all(PieceCosts(), [0.1, 0.1, 10.0])
    assert costs.bad
    costs.record(0.0)  # not measured
    costs.record(float("nan"))
    assert costs.bad
    assert len(costs) == 3
    costs.record(0.1)
    assert not costs.bad


def test_a_full_window_uses_three_sigma_of_the_last_pieces_only() -> None:
    rng = random.Random(5)
    history = [rng.uniform(0.5, 1.5) for _ in range(WINDOW + 50)]
    costs = record_all(PieceCosts(), history)
    window = history[-WINDOW:]
    limit = statistics.mean(window) + 3 * statistics.pstdev(window)
    assert not record_all(PieceCosts(), [*history, limit * 0.99]).bad
    costs.record(limit * 1.01)
    assert costs.bad
    assert len(costs) == WINDOW


def test_old_history_ages_out() -> None:
    """A parent that was slow long ago is judged by its recent pieces (running sums stay exact)."""
    costs = record_all(PieceCosts(), [50.0] * WINDOW + [0.1] * WINDOW)
    costs.record(3.0)  # 30 × its recent pieces, far below the old ones
    assert costs.bad
