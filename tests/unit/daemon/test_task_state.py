"""TaskState: one live task's layout, pieces and listeners."""

import pytest

from dfly.common.errors import DflyError, ProtocolError
from dfly.daemon.core.task_state import TaskState


def test_pieces_become_available_once_and_listeners_hear_each() -> None:
    state = TaskState("t" * 64)
    state.set_layout(10 * 1024, 4096)
    heard: list[int] = []
    unsubscribe = state.subscribe(heard.append)
    assert state.mark_available(1, 111)
    assert not state.mark_available(1, 222)  # the first digest is final
    assert state.piece_digest(1) == 111
    unsubscribe()
    state.mark_available(0, 5)
    assert heard == [1]
    assert not state.complete
    state.mark_available(2, 6)
    assert state.complete
    assert state.digests_in_order() == [5, 111, 6]


def test_layout_is_fixed_once() -> None:
    state = TaskState("t" * 64)
    state.set_layout(100, 64)
    state.set_layout(100, 64)
    with pytest.raises(ProtocolError):
        state.set_layout(100, 32)


def test_piece_outside_layout_is_refused() -> None:
    state = TaskState("t" * 64)
    with pytest.raises(ProtocolError):
        state.mark_available(0, 1)  # no layout yet
    state.set_layout(100, 64)
    with pytest.raises(ProtocolError):
        state.mark_available(2, 1)


def test_end_is_told_once_and_to_late_listeners() -> None:
    state = TaskState("t" * 64)
    ends: list[DflyError | None] = []
    state.on_end(ends.append)
    error = DflyError("boom")
    state.end(error)
    state.end(None)
    state.on_end(ends.append)
    assert ends == [error, error]


def test_forgotten_pieces_are_wanted_again() -> None:
    state = TaskState("t" * 64)
    state.set_layout(128, 64)
    state.mark_available(0, 1)
    state.mark_available(1, 2)
    state.forget_pieces([1])
    assert state.available_pieces() == [0]
    assert state.mark_available(1, 3)
    assert state.version(1) == 1  # attachers holding version 0 copy it again
    assert state.version(0) == 0
    state.forget_pieces([1, 1])
    assert state.version(1) == 2
    state.forget_pieces([1])  # not held: nothing to invalidate
    assert state.version(1) == 2
