"""The daemon's stop runs every step, in order, whatever one of them raises (lifecycle.stop_in_order)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dfly.daemon.lifecycle import stop_in_order


def test_a_failing_step_is_logged_and_the_later_ones_still_run(caplog: pytest.LogCaptureFixture) -> None:
    """A step that raised (the leave from the schedulers, on a hostname protobuf could not encode)
    skipped the rest: the scheduler connections and the storage were never closed, so the next start
    took the stop for a crash."""
    ran: list[str] = []

    async def leave() -> None:
        ran.append("leave")
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    def join() -> None:
        ran.append("join")

    async def close_storage() -> None:
        ran.append("storage")

    with caplog.at_level(logging.ERROR):
        asyncio.run(stop_in_order(("the leave", leave), ("the thread", join), ("the storage", close_storage)))
    assert ran == ["leave", "join", "storage"]
    assert "stopping the leave failed" in caplog.text
