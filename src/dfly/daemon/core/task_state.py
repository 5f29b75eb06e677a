"""One live task per task id: its layout, the pieces available with their digests, and who listens.

Pure bookkeeping (no I/O, no clock). Every consumer of a task (dfget attachments, the piece server's
HAVE pushes, a second dfget, the conductor) reads this object and subscribes to it, so a task is
downloaded once however many requests attach to it.

Rules:
- The layout (content length, piece length) is set once; a different layout later is an error. A held
  copy's layout may be dropped, with its pieces, before anyone is told of them (task_file.py).
- A piece becomes available with the digest it was verified against. It is forgotten only when its
  bytes were found to be of the wrong object (the scheduler's cross-check, or the origin's validators
  changed); each forgetting bumps the piece's `version`, so attachers that copied it copy it again, and
  is passed to `on_forget` (the storage drops the pieces' records: no restart trusts them).
- Listeners are told of each newly available piece, and once of the task's end (None = finished).
- `Announcer` gives one attacher the pieces it has not copied yet (or copied in an older version),
  costing O(new pieces) per look, never a scan of the whole task.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dfly.common.errors import DflyError, ProtocolError
from dfly.common.pieces import piece_count, piece_range
from dfly.daemon.core.first_pass import FirstPassGate


@dataclass(frozen=True, slots=True)
class Layout:
    content_length: int
    piece_length: int

    @property
    def piece_count(self) -> int:
        return piece_count(self.content_length, self.piece_length)

    def piece_range(self, number: int) -> tuple[int, int]:
        return piece_range(number, self.piece_length, self.content_length)


MISSING = -1  # no digest (digests are CRC-32s, never negative); storage recovers its arrays with it too
PieceListener = Callable[[int], None]
EndListener = Callable[[DflyError | None], None]


class TaskState:
    def __init__(self, task_id: str, url: str = "") -> None:
        self.task_id = task_id
        self.url = url
        self.layout: Layout | None = None
        self.response_headers: dict[str, str] = {}
        # Per piece its digest, or MISSING: one 8-byte slot each, sized with the layout (a dict of ints
        # cost ~75 bytes a piece, gigabytes for a seed holding 10^5 tasks of hundreds of pieces).
        self._digests = array("q")
        self._available = 0
        self._versions: dict[int, int] = {}  # piece -> times forgotten (absent: 0)
        self._piece_listeners: list[PieceListener] = []
        self._end_listeners: list[EndListener] = []
        self.ended = False
        self.error: DflyError | None = None
        self.first_pass: FirstPassGate | None = None  # set while this daemon is the task's source
        # set by the conductor while it downloads from parents: whether parent `peer_id` announced piece n
        self.parent_has: Callable[[str, int], bool] | None = None
        # set by the task manager: told (task id, pieces) of the pieces forgotten (Storage.forget_pieces)
        self.on_forget: Callable[[str, list[int]], None] | None = None

    # -- layout -----------------------------------------------------------------------------------
    def set_layout(self, content_length: int, piece_length: int) -> Layout:
        new = Layout(content_length, piece_length)
        if self.layout is not None and self.layout != new:
            raise ProtocolError(
                f"task {self.task_id[:12]} layout {content_length}/{piece_length} differs from "
                f"{self.layout.content_length}/{self.layout.piece_length}"
            )
        if self.layout is None:
            self._digests = array("q", [MISSING]) * new.piece_count
        self.layout = new
        return new

    def drop_layout(self) -> None:
        """Forget a held copy of another layout (nobody was told of it): no layout, no piece."""
        for number in self.available_pieces():
            self._versions[number] = self._versions.get(number, 0) + 1
        self.layout = None
        self._digests = array("q")
        self._available = 0

    # -- pieces -----------------------------------------------------------------------------------
    @property
    def piece_count(self) -> int:
        return self.layout.piece_count if self.layout else 0

    @property
    def complete(self) -> bool:
        return self.layout is not None and self._available == self.layout.piece_count

    @property
    def available_count(self) -> int:
        return self._available

    def available_pieces(self) -> list[int]:
        return [n for n, digest in enumerate(self._digests) if digest != MISSING]

    def has(self, number: int) -> bool:
        return 0 <= number < len(self._digests) and self._digests[number] != MISSING

    def piece_digest(self, number: int) -> int | None:
        if not 0 <= number < len(self._digests):
            return None
        digest = self._digests[number]
        return None if digest == MISSING else digest

    def digests_in_order(self) -> list[int]:
        """Every piece's digest (call it once the task is complete)."""
        if not self.complete:
            raise ProtocolError(f"task {self.task_id[:12]} is not complete")
        return self._digests.tolist()

    def load_digests(self, digests: array[int]) -> None:
        """Pieces recovered from storage, an array("q") of one slot per piece: its digest, or -1 when not
        held (the layout set first, no piece available yet). The array is taken over, not copied."""
        if digests.typecode != "q" or len(digests) != len(self._digests) or self._available:
            raise ProtocolError(f"task {self.task_id[:12]}: recovered digests do not fit its layout")
        self._digests = digests
        self._available = len(digests) - digests.count(MISSING)

    def load_pieces(self, digests: dict[int, int]) -> None:
        """Pieces recovered from storage (the layout set first); no listener is told (nobody listens)."""
        for number, digest in digests.items():
            if self._digests[number] == MISSING:
                self._available += 1
            self._digests[number] = digest

    def mark_available(self, number: int, digest: int) -> bool:
        """Record a verified, written piece; False if it was already available."""
        if self.layout is None or not 0 <= number < self.layout.piece_count:
            raise ProtocolError(f"piece {number} outside the layout of task {self.task_id[:12]}")
        if self._digests[number] != MISSING:
            return False
        self._digests[number] = digest
        self._available += 1
        for listener in list(self._piece_listeners):
            listener(number)
        return True

    def forget_pieces(self, numbers: Iterable[int]) -> None:
        """Drop pieces found to be of the wrong object so they are fetched again."""
        forgotten = []
        for number in numbers:
            if self.has(number):
                self._digests[number] = MISSING
                self._available -= 1
                self._versions[number] = self._versions.get(number, 0) + 1
                forgotten.append(number)
        if forgotten and self.on_forget is not None:
            self.on_forget(self.task_id, forgotten)

    def version(self, number: int) -> int:
        """How often the piece was forgotten: an attacher holding an older copy must copy it again."""
        return self._versions.get(number, 0)

    # -- listeners --------------------------------------------------------------------------------
    def subscribe(self, on_available: PieceListener) -> Callable[[], None]:
        self._piece_listeners.append(on_available)

        def unsubscribe() -> None:
            if on_available in self._piece_listeners:
                self._piece_listeners.remove(on_available)

        return unsubscribe

    def on_end(self, listener: EndListener) -> Callable[[], None]:
        if self.ended:
            listener(self.error)
            return lambda: None
        self._end_listeners.append(listener)

        def remove() -> None:
            if listener in self._end_listeners:
                self._end_listeners.remove(listener)

        return remove

    def end(self, error: DflyError | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        listeners, self._end_listeners = self._end_listeners, []
        for listener in listeners:
            listener(error)


class Announcer:
    """The pieces one attacher (a dfget) still has to be told of: each available piece once per version."""

    def __init__(self, state: TaskState) -> None:
        self._state = state
        self._arrived: list[int] = []
        self._told: dict[int, int] = {}  # piece -> version told
        self.unsubscribe = state.subscribe(self._arrived.append)

    def start(self) -> None:
        """From now on: every piece already available, then those the subscription reports."""
        self._arrived[:] = self._state.available_pieces()

    def take(self) -> list[int]:
        """Pieces to tell now, in order (a forgotten piece that is available again is told again)."""
        state, told = self._state, self._told
        fresh = [n for n in sorted(set(self._arrived)) if state.has(n) and told.get(n) != state.version(n)]
        self._arrived.clear()
        told.update((n, state.version(n)) for n in fresh)
        return fresh

    @property
    def told_count(self) -> int:
        return len(self._told)
