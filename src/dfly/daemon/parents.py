"""The parents of one download: piece-protocol connections driven by the pure DownloadPlanner.

Owned by a Conductor and used only from its loop. Parent callbacks (HAVE, PIECE, failures, close) update
the planner at once; `pump()` turns the planner's choices into REQUEST/CANCEL frames.

Rules:
- At most `download.max_parents` parents, never one that failed this download before.
- A parent that closes, breaks the protocol or sends a corrupt piece is dropped and reported to the
  scheduler on the next reschedule (unreachable when it could not be connected at all, not when it
  answered with an ERROR such as unknown_task; corrupt when a piece failed its CRC, which the scheduler
  counts against the parent's host).
- A request older than `download.piece_timeout_s` is cancelled and that piece asked of another holder;
  if the parent sent not one byte in that time (stopped, hung, its link dead) it is dropped and
  reported too: a stalled parent must not cost one timeout per piece (a slow one is kept).
- Piece bytes are written by the conductor (`store_piece`) before the buffer returns to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import DflyError, DigestMismatch, is_out_of_descriptors
from dfly.common.net import host_port
from dfly.daemon.core.planner import DownloadPlanner
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.client import ParentConnection, connect_parent

if TYPE_CHECKING:
    from dfly.daemon.conductor import Conductor

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


class ParentSet:
    def __init__(self, conductor: Conductor) -> None:
        self.c = conductor
        self.active = False  # downloading from parents (not waiting, not back-to-source)
        self._planner: DownloadPlanner | None = None
        self._conns: dict[str, ParentConnection] = {}
        self._ever: dict[str, ParentConnection] = {}  # closed ones too: buffers go back through them
        self._connecting: set[str] = set()
        self._infos: dict[str, pb.CandidateParent] = {}
        self._known: dict[str, set[int]] = {}
        self._blocked: set[str] = set()
        self._new_blocked: list[str] = []
        self._new_unreachable: list[str] = []
        self._new_corrupt: list[str] = []
        self._progress: dict[str, tuple[int, float]] = {}  # parent -> (bytes received, when that changed)
        conductor.state.parent_has = self.parent_has  # the piece server skips HAVEs these parents need not

    def __len__(self) -> int:
        return len(self._conns) + len(self._connecting)

    def parent_has(self, peer_id: str, number: int) -> bool:
        """Whether connected parent `peer_id` announced piece n."""
        conn = self._conns.get(peer_id)
        return conn is not None and p.has_bit(conn.parent_has, number)

    @property
    def connected(self) -> bool:
        return bool(self._conns)

    # -- membership -------------------------------------------------------------------------------
    def _ensure_planner(self) -> DownloadPlanner:
        if self._planner is None:
            cfg = self.c.ctx.config.download
            self._planner = DownloadPlanner(
                self.c.state.piece_count,
                self.c.state.available_pieces(),
                requests_per_parent=cfg.requests_per_parent,
                rng=self.c.ctx.rng,
                piece_timeout_s=cfg.piece_timeout_s,
            )
        return self._planner

    def add_candidates(self, candidates: list[pb.CandidateParent]) -> None:
        self.active = True
        self._ensure_planner()
        limit = self.c.ctx.config.download.max_parents
        for cand in candidates:
            if len(self) >= limit:
                break
            if (
                cand.peer_id in self._conns
                or cand.peer_id in self._connecting
                or cand.peer_id in self._blocked
            ):
                continue
            if cand.peer_id == self.c.peer_id:
                continue
            self._infos[cand.peer_id] = cand
            self._connecting.add(cand.peer_id)
            log.debug("task %s: connecting to parent %s", self.c.state.task_id[:12], cand.peer_id)
            self.c.spawn(self._connect(cand))

    async def _connect(self, cand: pb.CandidateParent) -> None:
        layout = self.c.state.layout
        assert layout is not None
        try:
            conn = await connect_parent(
                cand.ip,
                cand.piece_port,
                task_id=self.c.state.task_id,
                peer_id=self.c.peer_id,
                piece_length=layout.piece_length,
                content_length=layout.content_length,
                parent_id=cand.peer_id,
                listener=self,
                pool=self.c.ctx.pool,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                ssl_context=self.c.ctx.piece_tls,
            )
        except (OSError, TimeoutError) as exc:
            self._connecting.discard(cand.peer_id)
            if is_out_of_descriptors(exc):  # this host's load: the parent is neither blamed nor blocked
                log.warning("cannot connect to parent %s: out of file descriptors", cand.peer_id)
                self.c.events.put_nowait(None)  # the conductor looks again (other parents, a reschedule)
                return
            # asyncio's own text names the address as a Python tuple: ('::1', 21605, 0, 0)
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or "timed out"
            log.info(
                "parent %s at %s unreachable: %s", cand.peer_id, host_port(cand.ip, cand.piece_port), reason
            )
            self._fail(cand.peer_id, unreachable=True)
            return
        except DflyError as exc:  # it answered (e.g. unknown_task: evicted by its GC): not unreachable
            log.info("parent %s refused: %s", cand.peer_id, exc)
            self._connecting.discard(cand.peer_id)
            self._fail(cand.peer_id)
            return
        self._connecting.discard(cand.peer_id)
        if not self.active or cand.peer_id in self._blocked:
            conn.close()
            return
        self._conns[cand.peer_id] = conn
        self._ever[cand.peer_id] = conn
        self._progress[cand.peer_id] = (0, asyncio.get_running_loop().time())
        self._ensure_planner().add_parent(cand.peer_id)
        self._ensure_planner().parent_has(cand.peer_id, self._known.get(cand.peer_id, ()))
        self.c.events.put_nowait(None)

    def _fail(self, parent_id: str, *, unreachable: bool = False, corrupt: bool = False) -> None:
        if parent_id not in self._blocked:
            self._blocked.add(parent_id)
            if corrupt:
                self._new_corrupt.append(parent_id)
            else:
                (self._new_unreachable if unreachable else self._new_blocked).append(parent_id)
        conn = self._conns.pop(parent_id, None)
        if conn is not None:
            conn.close()
        if self._planner is not None and parent_id in self._planner.parents:
            self._planner.remove_parent(parent_id)
        self.c.events.put_nowait(None)

    def take_failed(self) -> pb.Reschedule:
        """The parents failed since the last call, as the report fields of a Reschedule."""
        report = pb.Reschedule(
            blocked_parents=self._new_blocked,
            unreachable_parents=self._new_unreachable,
            corrupt_parents=self._new_corrupt,
        )
        self._new_blocked, self._new_unreachable, self._new_corrupt = [], [], []
        return report

    def helpless(self) -> bool:
        """Nothing to wait for from parents: none active, none left, or none holds a missing piece."""
        if not self.active or (not self._conns and not self._connecting):
            return True
        return self._planner is not None and not self._connecting and self._planner.stalled()

    def stalled(self) -> bool:
        """No parent left or coming: the scheduler must be asked again."""
        return self.active and not self._conns and not self._connecting

    def refetch(self, pieces: list[int]) -> None:
        """Pieces found bad at the end: rebuild the plan so they are wanted again."""
        self._planner = None
        planner = self._ensure_planner()
        for parent_id in self._conns:
            planner.add_parent(parent_id)
            planner.parent_has(parent_id, self._known.get(parent_id, ()))

    def pieces_lost(self, pieces: list[int]) -> None:
        """Pieces stored earlier are gone (a failed sync): wanted again from the parents that hold them."""
        planner = self._ensure_planner()
        for piece in pieces:
            planner.piece_lost(piece)
        for parent_id in self._conns:
            planner.parent_has(parent_id, self._known.get(parent_id, set()).intersection(pieces))

    def close_all(self) -> None:
        self.active = False
        if self.c.state.parent_has == self.parent_has:  # the state outlives the attempt: let go of it
            self.c.state.parent_has = None
        conns, self._conns = list(self._conns.values()), {}
        self._planner = None
        for conn in conns:
            conn.close()

    # -- driving the planner ----------------------------------------------------------------------
    async def pump(self, now: float) -> None:
        planner = self._planner
        if planner is None or not self.active:
            return
        layout = self.c.state.layout
        assert layout is not None
        stalled: set[str] = set()
        timeout_s = self.c.ctx.config.download.piece_timeout_s
        for parent_id, live in self._conns.items():
            seen, _ = self._progress.get(parent_id, (-1, now))
            if live.bytes_received != seen:
                self._progress[parent_id] = (live.bytes_received, now)
        for expired in planner.expired(now):
            conn = self._conns.get(expired.parent_id)
            if conn is not None:
                conn.cancel(expired.piece)
            planner.piece_failed(expired.parent_id, expired.piece)
            if now - self._progress.get(expired.parent_id, (0, now))[1] >= timeout_s:
                stalled.add(expired.parent_id)  # not one byte in that time: slow is not stalled
        for parent_id in stalled:
            silent_s = now - self._progress[parent_id][1]
            log.warning(
                "task %s: parent %s sent no piece for %.0f s; dropped",
                self.c.state.task_id[:12],
                parent_id,
                silent_s,
            )
            self._fail(parent_id)
        # Only as many requests as the shared buffer pool can take now: a request that waited for a
        # buffer held this loop (and the expiry check above) until a stalled parent's buffers came back,
        # which was never (the expiry that frees them runs here). The rest follow on the next step.
        room = self.c.ctx.pool.room_for(layout.piece_length)
        for request in planner.next_requests(now, limit=room):
            conn = self._conns.get(request.parent_id)
            if conn is None:
                continue
            try:
                await conn.request(request.piece, layout.piece_range(request.piece)[1])
            except ConnectionError:
                pass  # it closed while waiting for a buffer; on_closed drops it

    # -- ParentListener ---------------------------------------------------------------------------
    def on_have(self, parent_id: str, pieces: list[int]) -> None:
        self._known.setdefault(parent_id, set()).update(pieces)
        if self._planner is not None and parent_id in self._conns:
            self._planner.parent_has(parent_id, pieces)
            if self._planner.has_room(parent_id):  # else no request can follow from it now: no step
                self.c.events.put_nowait(None)

    def on_piece(self, parent_id: str, number: int, offset: int, data: memoryview, digest: int) -> None:
        cost_s = 0.0  # request handed out -> verified piece; the scheduler's bad-parent detection
        if self._planner is not None and parent_id in self._conns:
            asked = self._planner.requested_at(parent_id, number)
            if asked is not None:
                cost_s = asyncio.get_running_loop().time() - asked
            for cancel in self._planner.piece_done(parent_id, number):
                other = self._conns.get(cancel.parent_id)
                if other is not None:
                    other.cancel(cancel.piece)
        info = self._infos.get(parent_id)
        source = "remote_seed" if info is not None and info.seed else "remote_peer"
        conn = self._conns.get(parent_id)
        stored = self.c.spawn(self._store(conn, parent_id, number, data, digest, source, cost_s))
        if not stored and conn is not None:
            conn.release(data)  # the attempt is ending and nothing stores it: the buffer goes back

    async def _store(
        self,
        conn: ParentConnection | None,
        parent_id: str,
        number: int,
        data: memoryview,
        digest: int,
        source: str,
        cost_s: float,
    ) -> None:
        try:
            await self.c.store_piece(number, data, digest, source, parent_id, cost_s)
        finally:
            if conn is not None:
                conn.release(data)

    def on_piece_failed(self, parent_id: str, number: int, reason: str) -> None:
        if self._planner is not None and parent_id in self._conns:
            self._planner.piece_failed(parent_id, number, parent_lacks=reason == "not_available")
        if reason != "not_available":
            log.warning("parent %s failed piece %d: %s", parent_id, number, reason)
        self.c.events.put_nowait(None)

    def on_closed(self, parent_id: str, error: Exception | None) -> None:
        if parent_id in self._conns:
            log.info("parent %s closed: %s", parent_id, error or "by the parent, cleanly")
            self._fail(parent_id, corrupt=isinstance(error, DigestMismatch))
