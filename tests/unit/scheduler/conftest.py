"""Fixtures of the scheduler unit tests."""

from __future__ import annotations

import pytest
from scheduler_testkit import Harness


@pytest.fixture
def harness() -> Harness:
    return Harness()
