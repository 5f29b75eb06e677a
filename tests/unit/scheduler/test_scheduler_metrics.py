"""The scheduler's labelled counters exist at 0 before their first event (a rate() or ratio of a
series that does not exist yet shows nothing instead of 0), and events move the right series."""

from __future__ import annotations

from prometheus_client import generate_latest

from dfly.scheduler.core.messages import SeedTriggerFailed
from dfly.scheduler.metrics import SchedulerMetrics


def exposition(metrics: SchedulerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_every_labelled_series_exists_from_the_start() -> None:
    text = exposition(SchedulerMetrics())
    for series in (
        'dfly_scheduler_seed_triggers_total{result="sent"} 0.0',
        'dfly_scheduler_seed_triggers_total{result="failed"} 0.0',
        'dfly_scheduler_task_failures_total{cause="origin"} 0.0',
        'dfly_scheduler_task_failures_total{cause="scheduling"} 0.0',
        'dfly_scheduler_finish_verdicts_total{accepted="true"} 0.0',
        'dfly_scheduler_finish_verdicts_total{accepted="false"} 0.0',
    ):
        assert series in text


def test_an_event_counts_in_its_own_series_only() -> None:
    metrics = SchedulerMetrics()
    metrics.observe_event(SeedTriggerFailed(task_id="t", seed_host_id="s", description="refused"))
    text = exposition(metrics)
    assert 'dfly_scheduler_seed_triggers_total{result="failed"} 1.0' in text
    assert 'dfly_scheduler_seed_triggers_total{result="sent"} 0.0' in text
