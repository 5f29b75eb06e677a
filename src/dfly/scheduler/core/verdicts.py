"""Cross-check of a finished child's piece digests against those the origin readers published.

A child's finish is rejected at once when any digest differs from a published one (bad_pieces lists
them, with any piece the child did not report). While digests are missing and some origin reader is
still running, the verdict waits (`None`); once no reader is left it is decided on what is known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dfly.scheduler.core.messages import FinishedPiece
from dfly.scheduler.core.model import Task


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    bad_pieces: tuple[int, ...] = ()


def publish(task: Task, pieces: Iterable[FinishedPiece]) -> bool:
    """Record digests of pieces read from the origin (first one wins); True if any was new. Only pieces
    of the task's layout count: none before it is known, none numbered past its end."""
    count = task.expected_piece_count()
    if count is None:
        return False
    added = False
    for piece in pieces:
        if piece.parent_id == "" and 0 <= piece.number < count and piece.number not in task.published_digests:
            task.published_digests[piece.number] = piece.digest
            added = True
    return added


def publish_all(task: Task, digests: Sequence[int]) -> bool:
    """Record a complete digest list (an origin reader's finish, or a host's finished task); a list of
    another length than the layout's piece count is not one, and is ignored."""
    if len(digests) != task.expected_piece_count():
        return False
    return publish(task, (FinishedPiece(number, digest) for number, digest in enumerate(digests)))


def holds_current_object(task: Task, digests: Sequence[int]) -> bool:
    """Whether a whole copy's digests are those published for the task's object now, every piece of it
    (a copy matching the first pieces published may differ further on)."""
    published = task.published_digests
    if len(digests) != task.expected_piece_count() or len(published) != len(digests):
        return False
    return all(digests[number] == digest for number, digest in published.items())


def judge(
    digests: tuple[int, ...], published: Mapping[int, int], expected_count: int | None, readers_running: bool
) -> Verdict | None:
    """The verdict on a child's digests, or None to wait for more published digests."""
    bad = [number for number, digest in enumerate(digests) if published.get(number, digest) != digest]
    if expected_count is not None and len(digests) < expected_count:
        bad.extend(range(len(digests), expected_count))
    if bad:
        return Verdict(accepted=False, bad_pieces=tuple(bad))
    count = len(digests) if expected_count is None else expected_count
    missing = any(number not in published for number in range(count))
    if missing and readers_running:
        return None
    return Verdict(accepted=True)
