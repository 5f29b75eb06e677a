"""TaskState: one live task's layout, pieces and listeners."""

from array import array

import pytest

from dfly.common.errors import DflyError, ProtocolError
from dfly.daemon.core.task_state import Announcer, TaskState


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


def test_announcer_tells_each_piece_once_and_a_refetched_one_again() -> None:
    state = TaskState("t" * 64)
    state.set_layout(6 * 64, 64)
    state.mark_available(4, 40)
    announcer = Announcer(state)
    state.mark_available(1, 10)  # before start: covered by the first look
    announcer.start()
    assert announcer.take() == [1, 4]
    assert announcer.take() == []
    state.mark_available(3, 30)
    state.mark_available(0, 0)
    assert announcer.take() == [0, 3]
    state.forget_pieces([3])  # wrong bytes: not told again until available again
    assert announcer.take() == []
    state.mark_available(3, 31)
    assert announcer.take() == [3]
    assert announcer.told_count == 4
    announcer.unsubscribe()
    state.mark_available(5, 50)
    assert announcer.take() == []  # no longer listening


def test_announcer_cost_follows_new_pieces_not_the_task() -> None:
    state = TaskState("t" * 64)
    state.set_layout(4096 * 64, 64)
    announcer = Announcer(state)
    announcer.start()
    calls = 0
    version = state.version

    def counting_version(number: int) -> int:
        nonlocal calls
        calls += 1
        return version(number)

    state.version = counting_version  # type: ignore[method-assign]
    for n in range(4096):
        state.mark_available(n, n)
        assert announcer.take() == [n]
    assert calls <= 2 * 4096  # a scan of every available piece per look would be ~8.4 million


def test_a_held_task_costs_about_eight_bytes_a_piece() -> None:
    """A seed holds 10^5 tasks of hundreds of pieces for months: a dict of digests per task cost ~75
    bytes a piece (gigabytes in all)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = TaskState("t", "http://o/f")
        state.set_layout(10_000 * 1024, 1024)
        state.load_pieces({n: 2**31 + n for n in range(10_000)})
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert state.complete
    assert state.digests_in_order()[-1] == 2**31 + 9_999
    assert held < 20 * 10_000  # the array's 8 bytes a piece, and the object around it


def test_recovered_digests_are_taken_over_and_forgets_are_told() -> None:
    state = TaskState("t" * 64)
    state.set_layout(4 * 1024, 1024)
    state.load_digests(array("q", [7, -1, 9, 10]))
    assert state.available_pieces() == [0, 2, 3]
    assert not state.complete
    told: list[tuple[str, list[int]]] = []
    state.on_forget = lambda task_id, numbers: told.append((task_id, numbers))
    state.forget_pieces([1, 2, 3])  # 1 was not held: not told
    assert told == [("t" * 64, [2, 3])]
    assert state.available_pieces() == [0]
    other = TaskState("u" * 64)
    other.set_layout(4 * 1024, 1024)
    with pytest.raises(ProtocolError):
        other.load_digests(array("q", [1, 2]))  # not the layout's piece count
