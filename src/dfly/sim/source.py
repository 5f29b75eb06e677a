"""Back-to-source of one peer: stat the origin (one round trip), fix or adopt the layout, report
BackToSourceStarted, then one sequential GET from the first missing piece to the end, cut into pieces
as it streams; each piece is stored and announced as soon as it is read. Pieces already held are read
again but not stored (the real reader skips them the same way). The origin is one link of fixed
capacity shared by every stream reading it; every byte it sends is counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dfly.common.pieces import default_piece_length
from dfly.daemon.core.first_pass import FirstPassGate, hold_s
from dfly.scheduler.core.messages import BackToSourceStarted, TaskLayout
from dfly.sim.flows import Flow
from dfly.sim.model import World, piece_size

if TYPE_CHECKING:
    from dfly.sim.peer import SimPeer


class OriginStream:
    def __init__(self, world: World, peer: SimPeer, layout: TaskLayout | None) -> None:
        self.world = world
        self.peer = peer
        self.hint = layout
        self.flow: Flow | None = None
        self.next_piece = 0
        self.stopped = False

    def start(self) -> None:
        self.world.clock.after(2 * self.world.latency_s, self._stat_done)

    def stop(self) -> None:
        self.stopped = True
        if self.flow is not None:
            self.world.origin_bytes += self.world.net.cancel(self.flow)
            self.flow = None

    def _stat_done(self, _: object = None) -> None:
        if self.stopped:
            return
        peer = self.peer
        content_length = peer.task.content_length
        if self.hint is not None and self.hint.piece_length > 0:
            piece_length = self.hint.piece_length
        elif peer.piece_length:
            piece_length = peer.piece_length
        else:
            piece_length = peer.download.piece_length or default_piece_length(content_length)
        peer.ensure_layout(content_length, piece_length)
        if peer.settings.first_pass and peer.gate is None:
            peer.gate = self._first_pass_gate(peer.piece_count, peer.settings.first_pass_hold_s)
        peer.send(BackToSourceStarted(peer.peer_id, content_length, piece_length))
        missing = [n for n in range(peer.piece_count) if not peer.have[n]]
        if not missing:
            peer.step()
            return
        self.next_piece = missing[0]
        self.world.clock.after(2 * self.world.latency_s, self._read_next)

    def _first_pass_gate(self, piece_count: int, max_hold_s: float) -> FirstPassGate:
        """As dfly.daemon.back_to_source.first_pass_gate: released after its hold."""
        clock = self.world.clock
        started = clock.now
        gate: FirstPassGate

        def given_out() -> None:
            hold = hold_s(clock.now - started, max_hold_s)
            if hold > 0:
                clock.after(hold, _release, gate)
            else:
                gate.release()

        gate = FirstPassGate(piece_count, on_given_out=given_out)
        return gate

    def _read_next(self, _: object = None) -> None:
        peer = self.peer
        if self.stopped or self.next_piece >= peer.piece_count:
            return
        size = piece_size(self.next_piece, peer.piece_length, peer.task.content_length)
        self.flow = self.world.net.start(self.world.origin, peer.host.down, size, self._piece_read)

    def _piece_read(self, flow: Flow) -> None:
        self.flow = None
        self.world.origin_bytes += flow.size
        piece = self.next_piece
        self.next_piece += 1
        self._read_next()
        self.peer.store_piece(piece, "back_to_source", "")
        self.peer.step()


def start_back_to_source(peer: SimPeer, layout: TaskLayout | None) -> None:
    """The conductor's `_go_back_to_source`: once, never when complete; parents are closed first."""
    if peer.source is not None or peer.complete:
        return
    if peer.download.disable_back_to_source:
        peer.end("no parent could serve the task and back-to-source is disabled")
        return
    peer.schedule_deadline = None
    peer.close_parents()
    peer.source = OriginStream(peer.world, peer, layout)
    peer.source.start()


def _release(gate: FirstPassGate) -> None:
    gate.release()
