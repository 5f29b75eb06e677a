"""First-pass rule of a swarm's source: serve every piece once before serving any piece twice.

Why: in a swarm whose source uplink is the bottleneck (the usual case: one seed peer, many hosts),
every byte the source sends twice delays every host. While the source is on its first pass, a piece
already given to one child is refused to the others (ERROR not_available): they get it from the child
that has it, or from whoever that child passed it on to. Once every piece has been given out, the owner
releases the rule after a hold (`hold_s`: a tenth of the first pass's duration, at most
`upload.first_pass_hold_s`) and the source then serves anything to
anyone, so children that could not reach a piece through the mesh (a dead relay, a host with no
children) get it in the end game. The hold lets the last pieces given out cross the mesh first: released
at once, every child still missing them queues requests at the source, whose uplink then splits among
hundreds of children (simulated, 500 hosts × 3 GB: p50 1.53 × the bound released at once, 1.36 with a 1 s
hold; docs/simulation.md). Children refused a piece are told again that the source has it (the piece
server re-sends HAVE) when its claim is handed back (the child it was given to left before receiving
it) or at the release, whichever comes first. Without the first, a piece handed back that every
remaining child had been refused was asked for by nobody, so it was never given out again and the
release never came: the swarm stalled.

After the release the source still sends **one copy of a piece at a time**: a REQUEST for a piece it is
sending to another child is refused (not_available) and that child hears HAVE again when the copy is
delivered or handed back, by which time it may get the piece from the receiver. Without it, a piece
every child lacks (one held only by a host no child uses as a parent) is requested by all of them at
once and the source's uplink splits over its 200 upload slots, ~3 s per copy (simulated, 500 hosts ×
3 GB with 12 parents: 4.4 × the bound without the rule, 1.5 × with it; docs/simulation.md).

Rules:
- `claim(n)` when a REQUEST arrives during the first pass (True: serve it, it is now given out; False:
  refuse it), and after the release when its copy is about to be sent (a request queued behind others
  must not hold a piece back from every other child); `taken(n)` says what `claim` would.
- `unclaim(n)` when a claimed piece was not delivered after all (CANCEL before its header went out, the
  connection lost): it may be given to someone else. `delivered(n)` when it was sent.
- After the release, `claim(n)` is True only while no copy of n is being sent. (A first-pass claim
  delivered after the release frees the piece too, so two copies may overlap once.)
- `on_free(n, listener)` runs the listener once when n may be claimed again: during the first pass when
  its claim is handed back, or at the release; after the release when the copy being sent is
  delivered or handed back. At once if n may be claimed now.
- When the last piece is claimed (in flight counts) `on_given_out` runs once; the owner then calls
  `release()` (at once or after its hold). Released for good; release listeners run once, then.
- Pure and single-threaded: no clock (the owner times the hold); the event loop is the only caller.
"""

from __future__ import annotations

from collections.abc import Callable

ReleaseListener = Callable[[], None]
HOLD_SHARE = 0.1
"""The hold is this share of the first pass's duration, at most `upload.first_pass_hold_s`."""


def _nothing() -> None:
    pass


def hold_s(first_pass_s: float, max_hold_s: float) -> float:
    """Seconds to keep the gate shut after the last piece was given out."""
    return max(0.0, min(max_hold_s, HOLD_SHARE * first_pass_s))


class FirstPassGate:
    def __init__(self, piece_count: int, on_given_out: Callable[[], None] | None = None) -> None:
        if piece_count < 0:
            raise ValueError(f"piece_count must be >= 0, got {piece_count}")
        self._claimed = bytearray(piece_count)
        self._open = piece_count  # pieces not claimed yet
        self._on_given_out = on_given_out
        self._released = piece_count == 0
        self._listeners: dict[int, ReleaseListener] = {}
        self._next_key = 0
        self._sending: set[int] = set()  # after the release: pieces with a copy being sent
        self._free_listeners: dict[int, list[ReleaseListener]] = {}

    @property
    def released(self) -> bool:
        return self._released

    @property
    def given_out(self) -> bool:
        """Every piece is claimed (delivered or on its way)."""
        return self._open == 0

    @property
    def unclaimed(self) -> int:
        return self._open

    def claim(self, number: int) -> bool:
        """A child asks for piece `number`: True = serve it, False = another child has it or is getting it."""
        if self._released:
            if number in self._sending:
                return False
            self._sending.add(number)
            return True
        if self._claimed[number]:
            return False
        self._claimed[number] = 1
        self._open -= 1
        if self._open == 0 and self._on_given_out is not None:
            on_given_out, self._on_given_out = self._on_given_out, None
            on_given_out()
        return True

    def delivered(self, number: int) -> None:
        """A claimed piece was sent in full (during the first pass it stays given out)."""
        if self._released:
            self._free(number)

    def taken(self, number: int) -> bool:
        """Whether `claim(number)` would be refused now."""
        return number in self._sending if self._released else bool(self._claimed[number])

    def on_free(self, number: int, listener: ReleaseListener) -> Callable[[], None]:
        """Run `listener` once when `number` may be claimed again (see the rules above); returns a remover
        (a closed connection drops its listeners)."""
        if not self.taken(number):
            listener()
            return _nothing
        listeners = self._free_listeners.setdefault(number, [])
        listeners.append(listener)

        def remove() -> None:
            current = self._free_listeners.get(number)
            if current is listeners and listener in listeners:
                listeners.remove(listener)

        return remove

    def _free(self, number: int) -> None:
        if number not in self._sending:
            return
        self._sending.discard(number)
        for listener in self._free_listeners.pop(number, ()):
            listener()

    def release(self) -> None:
        """Serve anything to anyone from now on; release listeners run once (idempotent)."""
        if self._released:
            return
        self._released = True
        listeners, self._listeners = list(self._listeners.values()), {}
        waiting, self._free_listeners = self._free_listeners, {}  # nothing is being sent yet: all free
        for listener in listeners:
            listener()
        for number in sorted(waiting):
            for listener in waiting[number]:
                listener()

    def unclaim(self, number: int) -> None:
        """A claimed piece was not delivered: give it to the next child that asks."""
        if self._released:
            self._free(number)
            return
        if not self._claimed[number]:
            return
        self._claimed[number] = 0
        self._open += 1
        for listener in self._free_listeners.pop(number, ()):
            listener()

    def on_release(self, listener: ReleaseListener) -> Callable[[], None]:
        """Run `listener` once at release (never, if already released); returns a remover."""
        key = self._next_key
        self._next_key += 1
        if not self.released:
            self._listeners[key] = listener

        def remove() -> None:
            self._listeners.pop(key, None)

        return remove
