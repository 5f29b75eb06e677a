"""One piece connection (child, parent, task) and the parent's side of it, as the real piece server does:
REQUESTs queue FIFO and one piece at a time is sent, each holding one of the host's upload slots (a
FIFO semaphore, `upload.slots`); a CANCEL drops a queued request, or the current one while it waits for
a slot, never a piece being sent; HAVE frames wait behind the piece being sent (and behind the next
piece's wait for a slot) and go out before its header, or at its end when nothing else is queued;
ERROR not_available for a piece the parent does not hold. A parent reading the origin applies the
real first-pass gate (dfly.daemon.core.first_pass) exactly where the piece server does: a REQUEST for a
piece given to another child is refused with ERROR not_available and announced again (HAVE) when its
claim is handed back or the gate releases, and after the release a piece with a copy on its way to another
child (claimed when it is the next to be sent, not when its REQUEST is queued) is refused and announced
again once that copy is done; a claimed piece not delivered (cancelled in
the queue or while waiting for a slot, connection closed) is handed back. Every frame takes the hosts'
one-way delay.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from dfly.daemon.core.first_pass import FirstPassGate
from dfly.sim.flows import Flow
from dfly.sim.model import SimHost, World, piece_size

if TYPE_CHECKING:
    from dfly.sim.peer import SimPeer


class Conn:
    __slots__ = (
        "cancelled", "child", "claimed", "current", "delay", "error_out", "flow", "have_out", "open",
        "parent", "queue", "waiting", "waiting_free", "world",
    )  # fmt: skip

    def __init__(self, world: World, child: SimPeer, parent: SimPeer) -> None:
        self.world = world
        self.child = child
        self.parent = parent
        self.delay = world.delay(child.host, parent.host)
        self.queue: deque[int] = deque()
        self.current = -1  # the piece waiting for a slot or being sent
        self.cancelled = False  # the current piece was cancelled while waiting for its slot
        self.waiting = False  # waiting for an upload slot
        self.flow: Flow | None = None
        self.have_out: list[int] = []  # HAVEs waiting behind the piece being sent
        self.error_out: list[int] = []  # ERROR not_available frames waiting the same way
        self.claimed: set[int] = set()  # pieces the first-pass gate gave this child, not yet delivered
        # refused by the gate, announced again once it may be claimed: piece -> remover of the listener
        self.waiting_free: dict[int, Callable[[], None]] = {}
        self.open = True

    # --- frames from the child (they arrive after `delay`) ---------------------------------------------

    def send_request(self, piece: int) -> None:
        self.world.clock.after(self.delay, self._on_request, piece)

    def send_cancel(self, piece: int) -> None:
        self.world.clock.after(self.delay, self._on_cancel, piece)

    def _on_request(self, piece: int) -> None:
        if not self.open or self._refused_by_gate(piece):
            return
        self.queue.append(piece)
        if self.current < 0:
            self._send_next()

    def _on_cancel(self, piece: int) -> None:
        if not self.open:
            return
        if piece == self.current and self.waiting:
            self.cancelled = True
        elif piece in self.queue:
            self.queue.remove(piece)
            self._unclaim(piece)

    # --- the source's first-pass gate ---------------------------------------------------------------

    def _refused_by_gate(self, piece: int) -> bool:
        gate = self.parent.gate
        if gate is None or not self.parent.holds(piece):
            return False
        if gate.released:  # one copy at a time: claimed when its turn to be sent comes (_send_next)
            if not gate.taken(piece):
                return False
        elif gate.claim(piece):
            self.claimed.add(piece)
            return False
        self._refuse_taken(piece, gate)
        return True

    def _refuse_taken(self, piece: int, gate: FirstPassGate) -> None:
        self._error(piece)
        if piece not in self.waiting_free:  # once per piece, however often the child asks
            self.waiting_free[piece] = gate.on_free(piece, functools.partial(self._freed, piece))

    def _freed(self, piece: int) -> None:
        self.waiting_free.pop(piece, None)
        self.push_have(piece)

    def _unclaim(self, piece: int) -> None:
        if piece in self.claimed:
            self.claimed.discard(piece)
            gate = self.parent.gate
            if gate is not None:
                gate.unclaim(piece)

    # --- the parent's writer -------------------------------------------------------------------------

    def _send_next(self) -> None:
        parent = self.parent
        while self.queue:
            piece = self.queue.popleft()
            if not parent.holds(piece):
                self._unclaim(piece)
                self._error(piece)
                continue
            gate = parent.gate
            if gate is not None and gate.released and piece not in self.claimed:
                if not gate.claim(piece):  # another child's copy of it is on the wire
                    self._refuse_taken(piece, gate)
                    continue
                self.claimed.add(piece)
            self.current, self.cancelled = piece, False
            host = parent.host
            if host.slots_free > 0:
                host.slots_free -= 1
                self._begin()
            else:
                self.waiting = True
                host.slot_waiters.append(self)
            return
        self._flush_out()

    def _begin(self) -> bool:
        """Holding a slot: send the current piece, after any frames waiting in front of its header.
        False (slot not used) when the piece was cancelled while it waited."""
        self.waiting = False
        host = self.parent.host
        if self.cancelled:
            self._unclaim(self.current)
            self.current = -1
            return False
        self._flush_out()
        task = self.parent.task
        size = piece_size(self.current, self.parent.piece_length, task.content_length)
        host.uploads_in_flight += 1
        self.flow = self.world.net.start(host.up, self.child.host.down, size, self._sent)
        return True

    def _sent(self, flow: Flow) -> None:
        self.flow = None
        host = self.parent.host
        host.uploads_in_flight -= 1
        host.uploaded_bytes += flow.size
        piece, self.current = self.current, -1
        if piece in self.claimed:  # delivered: during the first pass it stays given out
            self.claimed.discard(piece)
            gate = self.parent.gate
            if gate is not None:
                gate.delivered(piece)
        self.world.clock.after(self.delay, self.child.on_piece, (self, piece, self.parent.seed_source))
        _release_slot(host)
        self._send_next()

    def push_have(self, piece: int) -> None:
        """The parent has a new piece: a HAVE to this child, behind the piece being sent (if any)."""
        if not self.open:
            return
        if self.current >= 0:
            self.have_out.append(piece)
        else:
            self.world.clock.after(self.delay, self._deliver_haves, [piece])

    def _error(self, piece: int) -> None:
        """ERROR not_available for `piece`, behind the piece being sent (if any)."""
        if self.current >= 0:
            self.error_out.append(piece)
        else:
            self.world.clock.after(self.delay, self._deliver_errors, [piece])

    def _flush_out(self) -> None:
        if self.error_out:
            errors, self.error_out = self.error_out, []
            self.world.clock.after(self.delay, self._deliver_errors, errors)
        if self.have_out:
            pieces, self.have_out = self.have_out, []
            self.world.clock.after(self.delay, self._deliver_haves, pieces)

    def _deliver_errors(self, pieces: list[int]) -> None:
        if self.open:
            for piece in pieces:
                self.child.on_piece_failed((self, piece))

    def _deliver_haves(self, pieces: list[int]) -> None:
        if self.open:
            self.child.on_have(self, pieces)

    # --- closing -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Either side closes: the piece being sent is aborted, queued requests are dropped."""
        if not self.open:
            return
        self.open = False
        self.queue.clear()
        self.have_out = []
        self.error_out = []
        removers, self.waiting_free = list(self.waiting_free.values()), {}
        for remove in removers:
            remove()
        for piece in list(self.claimed):
            self._unclaim(piece)
        host = self.parent.host
        if self.flow is not None:
            self.world.cancelled_bytes += self.world.net.cancel(self.flow)
            self.flow = None
            host.uploads_in_flight -= 1
            _release_slot(host)
        self.waiting = False  # a stale entry in slot_waiters is skipped
        self.current = -1
        self.parent.children.pop(self.child.peer_id, None)


def _release_slot(host: SimHost) -> None:
    """Give the slot to the first connection still waiting for one (FIFO, like asyncio.Semaphore); one
    whose piece was cancelled meanwhile lets it go at once and moves on to its next request."""
    waiters = host.slot_waiters
    while waiters:
        conn = waiters.popleft()
        if conn.open and conn.waiting:
            if conn._begin():
                return
            conn._send_next()  # may queue it for a slot again, behind the others
    host.slots_free += 1
