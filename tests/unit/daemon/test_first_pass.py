"""FirstPassGate: each piece given out once before any twice; hand-back; release listeners."""

from __future__ import annotations

import pytest

from dfly.daemon.core.first_pass import FirstPassGate


def test_each_piece_is_given_once_until_all_are_given() -> None:
    gate = FirstPassGate(3)
    assert gate.claim(1)
    assert not gate.claim(1)  # another child asks for the same piece
    assert gate.claim(0)
    assert not gate.released
    assert gate.unclaimed == 1
    assert gate.claim(2)
    assert gate.released
    assert gate.claim(1)  # released: everything to everyone
    assert gate.claim(1)


def test_unclaimed_piece_goes_to_the_next_child() -> None:
    gate = FirstPassGate(2)
    assert gate.claim(0)
    gate.unclaim(0)  # cancelled before it was sent
    assert gate.unclaimed == 2
    assert gate.claim(0)
    gate.unclaim(1)  # never claimed: no effect
    assert gate.unclaimed == 1


def test_release_listeners_run_once_and_can_be_removed() -> None:
    gate = FirstPassGate(2)
    calls: list[str] = []
    gate.on_release(lambda: calls.append("a"))
    remove_b = gate.on_release(lambda: calls.append("b"))
    remove_b()
    gate.claim(0)
    assert calls == []
    gate.claim(1)
    assert calls == ["a"]
    gate.unclaim(1)  # after release: no effect, no second call
    gate.claim(1)
    assert gate.released
    gate.on_release(lambda: calls.append("late"))  # already released: never called
    assert calls == ["a"]


def test_empty_task_is_released_and_bad_count_rejected() -> None:
    assert FirstPassGate(0).released
    with pytest.raises(ValueError, match="piece_count"):
        FirstPassGate(-1)
