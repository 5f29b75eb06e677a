"""First-pass rule of a swarm's source: serve every piece once before serving any piece twice.

Why: in a swarm whose source uplink is the bottleneck (the usual case: one seed peer, many hosts),
every byte the source sends twice delays every host. While the source is on its first pass, a piece
already given to one child is refused to the others (ERROR not_available): they get it from the child
that has it, or from whoever that child passed it on to. Once every piece has been given out, the rule
is released and the source serves anything to anyone, so children that could not reach a piece through
the mesh (a dead relay, a host with no children) get it in the end game. Children refused a piece are
told again that the source has it at release (the piece server re-sends HAVE).

Rules:
- `claim(n)` when a REQUEST arrives: True (serve it; it is now given out) or False (refuse it).
- `unclaim(n)` when a claimed piece was not delivered after all (CANCEL before its header went out, the
  connection lost): it may be given to someone else.
- Released for good once every piece has been claimed (in flight counts); listeners run once, then.
- Pure and single-threaded: the piece server's event loop is the only caller.
"""

from __future__ import annotations

from collections.abc import Callable

ReleaseListener = Callable[[], None]


class FirstPassGate:
    def __init__(self, piece_count: int) -> None:
        if piece_count < 0:
            raise ValueError(f"piece_count must be >= 0, got {piece_count}")
        self._claimed = bytearray(piece_count)
        self._open = piece_count  # pieces not claimed yet
        self._listeners: dict[int, ReleaseListener] = {}
        self._next_key = 0

    @property
    def released(self) -> bool:
        return self._open == 0

    @property
    def unclaimed(self) -> int:
        return self._open

    def claim(self, number: int) -> bool:
        """A child asks for piece `number`: True = serve it, False = another child already has it."""
        if self.released:
            return True
        if self._claimed[number]:
            return False
        self._claimed[number] = 1
        self._open -= 1
        if self._open == 0:
            listeners, self._listeners = list(self._listeners.values()), {}
            for listener in listeners:
                listener()
        return True

    def unclaim(self, number: int) -> None:
        """A claimed piece was not delivered: give it to the next child that asks."""
        if self.released or not self._claimed[number]:
            return
        self._claimed[number] = 0
        self._open += 1

    def on_release(self, listener: ReleaseListener) -> Callable[[], None]:
        """Run `listener` once at release (never, if already released); returns a remover."""
        key = self._next_key
        self._next_key += 1
        if not self.released:
            self._listeners[key] = listener

        def remove() -> None:
            self._listeners.pop(key, None)

        return remove
