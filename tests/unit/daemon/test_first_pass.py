"""FirstPassGate: each piece given out once before any twice; hand-back; the hold; release listeners."""

from __future__ import annotations

import asyncio

import pytest

from dfly.daemon.back_to_source import first_pass_gate
from dfly.daemon.core.first_pass import FirstPassGate, hold_s


def released_when_given_out(piece_count: int) -> FirstPassGate:
    """A gate whose owner releases it at once (upload.first_pass_hold_s = 0)."""
    gate: FirstPassGate
    gate = FirstPassGate(piece_count, on_given_out=lambda: gate.release())
    return gate


def test_each_piece_is_given_once_until_all_are_given() -> None:
    gate = released_when_given_out(3)
    assert gate.claim(1)
    assert not gate.claim(1)  # another child asks for the same piece
    assert gate.claim(0)
    assert not gate.released
    assert gate.unclaimed == 1
    assert gate.claim(2)
    assert gate.released
    assert gate.claim(1)  # released: everything to everyone, one copy at a time
    gate.delivered(1)
    assert gate.claim(1)


def test_given_out_waits_for_the_owners_release() -> None:
    given_out: list[int] = []
    gate = FirstPassGate(2, on_given_out=lambda: given_out.append(1))
    assert gate.claim(0)
    assert gate.claim(1)
    assert given_out == [1]
    assert gate.given_out
    assert not gate.released
    assert not gate.claim(0)  # during the hold a piece is still given only once
    gate.unclaim(1)  # not delivered after all: the next child may have it
    assert not gate.given_out
    assert gate.claim(1)
    assert given_out == [1]  # told once
    gate.release()
    gate.release()  # idempotent
    assert gate.released
    assert gate.claim(0)


def test_unclaimed_piece_goes_to_the_next_child() -> None:
    gate = released_when_given_out(2)
    assert gate.claim(0)
    gate.unclaim(0)  # cancelled before it was sent
    assert gate.unclaimed == 2
    assert gate.claim(0)
    gate.unclaim(1)  # never claimed: no effect
    assert gate.unclaimed == 1


def test_release_listeners_run_once_and_can_be_removed() -> None:
    gate = released_when_given_out(2)
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


def test_hold_is_a_tenth_of_the_first_pass_capped() -> None:
    assert hold_s(2.0, 1.0) == pytest.approx(0.2)
    assert hold_s(60.0, 1.0) == 1.0
    assert hold_s(5.0, 0.0) == 0.0


def test_daemon_gate_releases_after_its_hold_on_the_loop() -> None:
    async def main() -> None:
        released = asyncio.Event()
        gate = first_pass_gate(1, 1.0, "t" * 64)
        gate.on_release(released.set)
        assert gate.claim(0)
        assert gate.given_out
        assert not gate.released  # held for a tenth of the (short) first pass
        await asyncio.wait_for(released.wait(), 5)
        assert gate.released
        instant = first_pass_gate(1, 0.0, "t" * 64)
        assert instant.claim(0)
        assert instant.released  # no hold: released with the last claim

    asyncio.run(main())


def test_after_release_one_copy_of_a_piece_at_a_time() -> None:
    gate = released_when_given_out(2)
    assert gate.claim(0)
    assert gate.claim(1)
    assert gate.released
    told: list[str] = []
    assert gate.claim(0)  # a second copy of piece 0, now that every piece is out
    assert not gate.claim(0)  # while it is being sent, nobody else gets piece 0
    gate.on_free(0, lambda: told.append("b"))
    gate.on_free(0, lambda: told.append("c"))
    assert gate.claim(1)  # other pieces are independent
    gate.delivered(0)
    assert told == ["b", "c"]  # each refused child is told once
    gate.delivered(0)  # nothing in flight: no effect
    assert told == ["b", "c"]
    assert gate.claim(0)
    gate.unclaim(0)  # handed back (cancelled, connection lost): free again
    assert gate.claim(0)
    gate.on_free(1, lambda: told.append("free at once"))  # 1 is being sent: waits
    gate.unclaim(1)
    assert told == ["b", "c", "free at once"]
    gate.on_free(1, lambda: told.append("not sending"))  # nothing in flight: runs now
    assert told[-1] == "not sending"


def test_during_the_first_pass_a_refused_child_is_told_when_the_claim_comes_back_or_at_release() -> None:
    gate = FirstPassGate(3)
    told: list[str] = []
    assert gate.claim(0)
    assert not gate.claim(0)  # refused: another child got it
    gate.on_free(0, lambda: told.append("handed back"))
    gate.on_free(2, lambda: told.append("nobody has 2"))  # not given out: may be claimed now
    assert told == ["nobody has 2"]
    gate.unclaim(0)  # the child it was given to left before receiving it
    assert told == ["nobody has 2", "handed back"]
    assert gate.claim(0)  # the refused child asks again and gets it
    gate.delivered(0)  # during the first pass it stays given out
    gate.on_free(0, lambda: told.append("released"))
    assert told[-1] == "handed back"
    gate.release()
    assert told[-1] == "released"  # told at the release instead
    gate.unclaim(0)  # nothing more to tell
    assert told.count("released") == 1


def test_a_removed_free_listener_is_not_run_and_not_kept() -> None:
    gate = FirstPassGate(2)
    told: list[str] = []
    assert gate.claim(0)
    remove = gate.on_free(0, lambda: told.append("closed connection"))
    keep = gate.on_free(0, lambda: told.append("open connection"))
    remove()
    remove()  # idempotent
    gate.unclaim(0)
    assert told == ["open connection"]
    keep()  # after it ran: nothing to remove
    assert gate.on_free(1, lambda: told.append("free now")) is not None
    assert told[-1] == "free now"
