"""One simulated download (a peer: one task on one host), doing what the real daemon's Conductor and
ParentSet do, driving the real DownloadPlanner:

- register with the scheduler; take the candidate parents it sends (up to `max_parents`, never one that
  failed this download), connect to each, feed its BITFIELD and HAVEs to the planner, send the planner's
  REQUESTs and CANCELs; a parent that closes is dropped and reported as blocked on the next reschedule
  (a `more_parents` one too);
- report PeerStarted on the first connection, PiecesFinished batched (the first batch at once, later ones
  at least `progress_report_interval_s` apart, and at completion), then PeerFinished and wait for the
  digest verdict (accepted without one after VERDICT_TIMEOUT_S);
- ask for more parents (reschedule `more_parents`) about once a second while holding fewer than
  `max_parents`; reschedule when no parent is left; go to the origin when the scheduler says so, or
  when it gave no parent within `schedule_timeout_s`;
- every piece it stores is announced (HAVE) to the children connected to it, which keep downloading from
  it after it finished, as the real piece server keeps serving.
The conductor's 0.2 s tick is replaced by a wake-up at the next deadline (report, more parents, planner
timeout, verdict, schedule timeout); all else reacts to events at once.
"""

from __future__ import annotations

import math

from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.core.planner import DownloadPlanner
from dfly.scheduler.core.messages import (
    CandidateParent,
    ClosePeer,
    Command,
    DownloadSpec,
    Event,
    FinishedPiece,
    PeerFinished,
    PeerRegistered,
    PeerStarted,
    PiecesFinished,
    RescheduleRequested,
    SendBackToSource,
    SendCandidateParents,
    SendFinishVerdict,
    SendTaskFailed,
)
from dfly.sim.model import (
    CONNECT_ONE_WAY_DELAYS,
    MORE_PARENTS_INTERVAL_S,
    VERDICT_TIMEOUT_S,
    SimHost,
    TaskSpec,
    World,
    layout_piece_count,
    piece_size,
)
from dfly.sim.source import OriginStream, start_back_to_source
from dfly.sim.upload import Conn


class SimPeer:
    def __init__(
        self, world: World, host: SimHost, task: TaskSpec, peer_id: str, download: DownloadSpec
    ) -> None:
        self.world = world
        self.host = host
        self.task = task
        self.peer_id = peer_id
        self.download = download
        self.settings = world.settings
        self.seed_source = "remote_seed" if host.seed else "remote_peer"
        self.piece_length = 0
        self.piece_count = 0
        self.have = bytearray()
        self.available = 0
        self.children: dict[str, Conn] = {}  # connections where this peer is the parent
        self.conns: dict[str, Conn] = {}  # connected parents
        self.connecting: set[str] = set()
        self.blocked: set[str] = set()
        self.new_blocked: list[str] = []
        self.new_unreachable: list[str] = []
        self.planner: DownloadPlanner | None = None
        self.expiry_at = math.inf  # never later than the planner's next request timeout
        self.active = False  # downloading from parents (not waiting, not back-to-source)
        self.report: list[FinishedPiece] = []
        self.last_report_at = -math.inf
        self.source: OriginStream | None = None
        self.gate: FirstPassGate | None = None  # set while it reads the origin (upload.first_pass)
        self.scheduler_alive = True
        self.verdict_deadline: float | None = None
        self.schedule_deadline: float | None = None
        self.more_parents_at = -math.inf
        self.started_sent = False
        self.ended = False
        self.succeeded = False
        self.error = ""
        self.started_at = 0.0
        self.all_pieces_at: float | None = None
        self.finished_at: float | None = None
        self.wake_at = math.inf

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        now = self.world.clock.now
        self.started_at = now
        self.send(PeerRegistered(self.peer_id, self.host.host_id, self.task.task_id, self.download))
        self.schedule_deadline = now + self.settings.schedule_timeout_s
        self.step()

    def send(self, event: Event) -> None:
        scheduler = self.world.scheduler
        if scheduler is not None and self.scheduler_alive:
            scheduler.send(event)

    def end(self, error: str = "") -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        self.succeeded = not error
        self.finished_at = self.world.clock.now
        self.close_parents()
        if self.source is not None:
            self.source.stop()
        self.world.peer_ended(self)

    def kill(self) -> None:
        """The host left: every connection closes, both ways."""
        if not self.ended:
            self.end("host left")
        for conn in list(self.children.values()):
            conn.close()
            self.world.clock.after(conn.delay, conn.child.on_parent_closed, conn)

    # --- scheduler commands --------------------------------------------------------------------------

    def on_command(self, command: Command) -> None:
        if self.ended:
            return
        if isinstance(command, SendCandidateParents):
            layout = command.layout
            if layout.piece_length > 0 and self.source is None:
                self.ensure_layout(layout.content_length, layout.piece_length)
                self.schedule_deadline = None
                self.add_candidates(command.parents)
        elif isinstance(command, SendBackToSource):
            start_back_to_source(self, command.layout)
        elif isinstance(command, SendTaskFailed):
            self.end(f"scheduler failed the download: {command.description}")
            return
        elif isinstance(command, SendFinishVerdict):
            self.end("" if command.accepted else f"{len(command.bad_pieces)} pieces rejected")
            return
        elif isinstance(command, ClosePeer):
            self.scheduler_alive = False
            if self.verdict_deadline is not None:
                self.end()
                return
            if not self.active and self.source is None and not self.complete:
                start_back_to_source(self, None)
        self.step()

    # --- layout and pieces ---------------------------------------------------------------------------

    def ensure_layout(self, content_length: int, piece_length: int) -> None:
        if self.piece_length == 0:
            self.piece_length = piece_length
            self.piece_count = layout_piece_count(content_length, piece_length)
            self.have = bytearray(self.piece_count)

    @property
    def complete(self) -> bool:
        return self.piece_count > 0 and self.available == self.piece_count

    def digests(self) -> tuple[int, ...]:
        return self.world.digests(self.task.task_id, self.piece_count)

    def holds(self, piece: int) -> bool:
        return piece < len(self.have) and self.have[piece] == 1

    def store_piece(self, piece: int, source: str, parent_id: str, cost_s: float = 0.0) -> None:
        if self.have[piece]:
            return
        self.have[piece] = 1
        self.available += 1
        self.world.piece_bytes[source] += piece_size(piece, self.piece_length, self.task.content_length)
        self.report.append(FinishedPiece(piece, self.digests()[piece], parent_id, cost_s))
        for conn in list(self.children.values()):
            conn.push_have(piece)

    # --- parents -------------------------------------------------------------------------------------

    def _ensure_planner(self) -> DownloadPlanner:
        if self.planner is None:
            self.planner = DownloadPlanner(
                self.piece_count,
                [n for n in range(self.piece_count) if self.have[n]],
                requests_per_parent=self.settings.requests_per_parent,
                rng=self.world.planner_rng(),
                piece_timeout_s=self.settings.piece_timeout_s,
            )
        return self.planner

    def add_candidates(self, candidates: tuple[CandidateParent, ...]) -> None:
        self.active = True
        self._ensure_planner()
        limit = self.settings.max_parents
        for cand in candidates:
            if len(self.conns) + len(self.connecting) >= limit:
                break
            parent_id = cand.peer_id
            if parent_id in self.conns or parent_id in self.connecting or parent_id in self.blocked:
                continue
            if parent_id == self.peer_id:
                continue
            self.connecting.add(parent_id)
            parent = self.world.peers.get(parent_id)
            delay = self.world.delay(self.host, parent.host) if parent is not None else self.world.latency_s
            self.world.clock.after(CONNECT_ONE_WAY_DELAYS * delay, self._connected, parent_id)

    def _connected(self, parent_id: str) -> None:
        if self.ended:
            self.connecting.discard(parent_id)
            return
        self.connecting.discard(parent_id)
        parent = self.world.peers.get(parent_id)
        if parent is None or not parent.host.alive or parent.piece_count == 0:
            self._fail(parent_id, unreachable=True)
            self.step()
            return
        if not self.active or parent_id in self.blocked:
            return
        conn = Conn(self.world, self, parent)
        self.conns[parent_id] = conn
        parent.children[self.peer_id] = conn
        planner = self._ensure_planner()
        planner.add_parent(parent_id)
        # BITFIELD. HAVEs only travel on open connections here, so unlike ParentSet nothing is kept per
        # parent (it keeps them for a refetch after a rejected verdict, which the model never sees).
        have = parent.have
        planner.parent_has(parent_id, [n for n in range(parent.piece_count) if have[n]])
        self.step()

    def _fail(self, parent_id: str, *, unreachable: bool = False) -> None:
        if parent_id not in self.blocked:
            self.blocked.add(parent_id)
            (self.new_unreachable if unreachable else self.new_blocked).append(parent_id)
        conn = self.conns.pop(parent_id, None)
        if conn is not None:
            conn.close()
        if self.planner is not None:
            self.planner.remove_parent(parent_id)

    def close_parents(self) -> None:
        self.active = False
        conns, self.conns = list(self.conns.values()), {}
        self.planner = None
        self.expiry_at = math.inf
        for conn in conns:
            conn.close()

    # --- frames from parents (each already delayed by the link) --------------------------------------

    def on_have(self, conn: Conn, pieces: list[int]) -> None:
        parent_id = conn.parent.peer_id
        if self.planner is not None and self.conns.get(parent_id) is conn and not self.ended:
            self.planner.parent_has(parent_id, pieces)
            # A HAVE changes only what can be requested (no report, deadline or parent count moves):
            # the conductor's full pass would do nothing else, so only the planner is pumped.
            expiry_at = self.expiry_at
            self._pump(self.world.clock.now)
            if self.expiry_at != expiry_at:
                self._arm(self.world.clock.now)

    def on_piece(self, arg: tuple[Conn, int, str]) -> None:
        conn, piece, source = arg
        if not conn.open:
            return  # the child closed the connection while the bytes were on the wire
        parent_id, cost_s = conn.parent.peer_id, 0.0
        if self.planner is not None and self.conns.get(parent_id) is conn:
            asked = self.planner.requested_at(parent_id, piece)
            cost_s = 0.0 if asked is None else self.world.clock.now - asked
            for cancel in self.planner.piece_done(parent_id, piece):
                other = self.conns.get(cancel.parent_id)
                if other is not None:
                    other.send_cancel(cancel.piece)
        self.store_piece(piece, source, parent_id, cost_s)
        self.step()

    def on_piece_failed(self, arg: tuple[Conn, int]) -> None:
        conn, piece = arg
        parent_id = conn.parent.peer_id
        if self.planner is not None and self.conns.get(parent_id) is conn:
            self.planner.piece_failed(parent_id, piece, parent_lacks=True)
            self.step()

    def on_parent_closed(self, conn: Conn) -> None:
        parent_id = conn.parent.peer_id
        if self.conns.get(parent_id) is conn:
            self._fail(parent_id)
            self.step()

    # --- the conductor's loop body -------------------------------------------------------------------

    def step(self) -> None:
        if self.ended:
            return
        now = self.world.clock.now
        settings = self.settings
        self._pump(now)
        if not self.started_sent and self.conns:
            self.started_sent = True
            self.send(PeerStarted(self.peer_id))
        if self.complete and self.verdict_deadline is None:
            self._complete(now)
            if self.ended:
                return
        elif self.verdict_deadline is not None and now >= self.verdict_deadline:
            self.end()  # no verdict in time: accepted, as the conductor does
            return
        elif self.schedule_deadline is not None and now >= self.schedule_deadline:
            self.schedule_deadline = None
            start_back_to_source(self, None)
        if now - self.last_report_at >= settings.progress_report_interval_s:
            self._flush_report(now)
        if self._wants_more_parents() and now >= self.more_parents_at:
            self.more_parents_at = now + MORE_PARENTS_INTERVAL_S
            blocked, unreachable = tuple(self.new_blocked), tuple(self.new_unreachable)
            self.new_blocked, self.new_unreachable = [], []
            more = RescheduleRequested(self.peer_id, blocked, unreachable, "more parents", more_parents=True)
            self.send(more)
        if self.active and not self.conns and not self.connecting and self.source is None:
            blocked, unreachable = tuple(self.new_blocked), tuple(self.new_unreachable)
            self.new_blocked, self.new_unreachable = [], []
            self.active = False
            self.schedule_deadline = now + settings.schedule_timeout_s
            self.send(RescheduleRequested(self.peer_id, blocked, unreachable, "no working parent"))
        self._arm(now)

    def _wants_more_parents(self) -> bool:
        return (
            self.active
            and not self.complete
            and self.source is None
            and len(self.conns) + len(self.connecting) < self.settings.max_parents
        )

    def _pump(self, now: float) -> None:
        planner = self.planner
        if planner is None or not self.active:
            return
        conns = self.conns
        if now >= self.expiry_at:  # planner.expired() is empty before its next deadline: skip the scan
            for expired in planner.expired(now):
                conn = conns.get(expired.parent_id)
                if conn is not None:
                    conn.send_cancel(expired.piece)
                planner.piece_failed(expired.parent_id, expired.piece)
            deadline = planner.next_deadline()
            self.expiry_at = math.inf if deadline is None else deadline
        requests = planner.next_requests(now)
        for request in requests:
            conn = conns.get(request.parent_id)
            if conn is not None:
                conn.send_request(request.piece)
        if requests and self.expiry_at == math.inf:
            self.expiry_at = now + self.settings.piece_timeout_s

    def _complete(self, now: float) -> None:
        self.all_pieces_at = now
        self._flush_report(now)
        if not self.scheduler_alive:
            self.end()
            return
        self.verdict_deadline = now + VERDICT_TIMEOUT_S
        self.send(PeerFinished(self.peer_id, self.digests()))

    def _flush_report(self, now: float) -> None:
        if self.report:
            self.last_report_at = now
            pieces, self.report = tuple(self.report), []
            self.send(PiecesFinished(self.peer_id, pieces))

    def _arm(self, now: float) -> None:
        at = math.inf
        if self.report:
            at = self.last_report_at + self.settings.progress_report_interval_s
        for deadline in (self.verdict_deadline, self.schedule_deadline):
            if deadline is not None and deadline < at:
                at = deadline
        if self._wants_more_parents() and self.more_parents_at < at:
            at = self.more_parents_at
        if self.planner is not None and self.active and self.expiry_at < at:
            at = self.expiry_at
        if at <= now:
            at = now + 1e-6
        if at < math.inf and (at < self.wake_at or self.wake_at <= now):
            self.wake_at = at
            self.world.clock.at(at, self._wake, at)

    def _wake(self, at: float) -> None:
        if at != self.wake_at:
            return
        self.wake_at = math.inf
        self.step()
