"""The simulator mirrors timing constants of the real daemon; this fails when they drift apart."""

from __future__ import annotations

from dfly.daemon import app, conductor
from dfly.sim import model


def test_conductor_timings_are_mirrored() -> None:
    assert model.VERDICT_TIMEOUT_S == conductor.VERDICT_TIMEOUT_S
    assert model.MORE_PARENTS_INTERVAL_S == conductor.MORE_PARENTS_INTERVAL_S


def test_upload_rate_sampling_is_mirrored() -> None:
    assert model.RATE_SAMPLE_S == app.RATE_SAMPLE_S
