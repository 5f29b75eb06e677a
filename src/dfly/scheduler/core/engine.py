"""SchedulerEngine: the pure scheduler. Events in, commands out; no I/O, no clock, injected randomness.

Drive it with `handle(event, now)`, and call `on_timer(now)` once `next_deadline()` has passed; both
return the commands to carry out, in order. The same events at the same times with the same seeded
`random.Random` give the same commands. Policy (DESIGN §4):
- waiting peers are scheduled on the event that makes a parent usable (an origin reader starting, a
  peer's first finished pieces, a host coming back with finished tasks); the retry timer is a fallback;
- a seed that could not be triggered, or failed without an origin error, is not retried for the task
  for `seed_failure_ttl_s`, and one waiting peer reads the origin instead; a seed that could not be
  reached (no answer in time) is also suspended for `unreachable_suspend_s`, for every task;
- an origin error (PeerFailed with a source error from an origin reader) fails every active peer of the
  task with that error and marks the task FAILED (the next register starts it over);
- a host whose keepalive stream drops or stays silent for `host_silence_s`, or that enough distinct children
  report unreachable (or corrupt), is suspended; when that (or a removal) leaves a task with nobody on a
  usable host holding it whole and nobody reading the origin, the running peer holding most pieces reads
  the rest once the task's peers stop reporting new pieces for `source_return_s`; a new boot id drops the
  host's old peers; finished tasks make it a parent again; a host disconnected for `host_ttl_s` is
  forgotten (a periodic sweep, every third of the shorter of the two, which also drops idle tasks whose
  seed failure has expired);
- a child's finish is checked against the digests the origin readers published (verdicts.py);
- an origin reader whose validators (ETag, else Last-Modified) differ from the task's found the object
  changed: the published digests are dropped, only readers of the new object publish from then on, a
  reader of the old one is judged as a child at its finish, and the old object's whole holders are no
  longer offered as parents, so no finish is accepted with pieces of two objects;
- a reschedule with `more_parents` (the child still has working parents) is answered with new parents
  only when there are some: never with back-to-source or failure, and it arms no retry.
Host events live in hosts.py; parent choice and retries in scheduling.py.
"""

from __future__ import annotations

import dataclasses
import random

from dfly.common.validators import same_object
from dfly.scheduler.core.cluster import Cluster, RemovedPeer, TaskView, of_current_object
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.costs import PieceCosts
from dfly.scheduler.core.graph import make_root
from dfly.scheduler.core.hosts import HostHandlers
from dfly.scheduler.core.messages import (
    BackToSourceStarted,
    ClosePeer,
    Command,
    Event,
    HostAnnounced,
    HostDisconnected,
    HostKeepAlive,
    HostLeft,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PeerRegistered,
    PeerStarted,
    PiecesFinished,
    RescheduleRequested,
    SeedTriggerFailed,
    SendFinishVerdict,
    SendTaskFailed,
    TaskDeleted,
    TaskLayout,
)
from dfly.scheduler.core.model import Peer, PeerState, Task, TaskState
from dfly.scheduler.core.scheduling import ParentScheduler
from dfly.scheduler.core.verdicts import holds_current_object, judge, publish, publish_all


class SchedulerEngine:
    def __init__(self, config: EngineConfig, rng: random.Random, *, started_at: float | None = None) -> None:
        """`started_at`: the service's clock at start, for EngineConfig.startup_grace_s (None: no grace)."""
        self.config = config
        self.cluster = Cluster()
        self.scheduler = ParentScheduler(config, rng, self.cluster, started_at)
        self._hosts = HostHandlers(
            config, self.cluster, self.scheduler, self.after_removal, self._recheck_verdicts
        )
        self._sweep_every = min(config.host_silence_s, config.host_ttl_s) / 3
        self._next_sweep: float | None = None  # armed by the first host announce

    # --- public API -----------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Command]:
        match event:
            case HostAnnounced():
                if self._next_sweep is None:
                    self._next_sweep = now + self._sweep_every
                return self._hosts.announced(event, now)
            case HostKeepAlive():
                return self._hosts.keepalive(event, now)
            case HostDisconnected():
                return self._hosts.disconnected(event, now)
            case HostLeft():
                return self._hosts.left(event, now)
            case TaskDeleted():
                return self._hosts.task_deleted(event, now)
            case PeerRegistered():
                return self._registered(event, now)
            case SeedTriggerFailed():
                return self._seed_trigger_failed(event, now)
        peer = self.cluster.peers.get(event.peer_id)
        if peer is None:
            return []  # a peer the engine already forgot (failed, left, host gone): nothing to do
        task = self.cluster.tasks[peer.task_id]
        match event:
            case PeerStarted():
                if peer.state is PeerState.RECEIVED:
                    peer.move_to(PeerState.RUNNING)
                return []
            case BackToSourceStarted():
                return self._back_to_source_started(peer, task, event, now)
            case PiecesFinished():
                return self._pieces_finished(peer, task, event, now)
            case PeerFinished():
                return self._finished(peer, task, event, now)
            case PeerFailed():
                return self._failed(peer, task, event, now)
            case RescheduleRequested():
                return self._reschedule(peer, task, event, now)
            case PeerLeft():
                return self.after_removal(self.cluster.remove_peer(peer, PeerState.LEAVE), now)
        return []

    def next_deadline(self) -> float | None:
        deadlines = [at for at in (self.scheduler.next_deadline(), self._next_sweep) if at is not None]
        return min(deadlines, default=None)

    def on_timer(self, now: float) -> list[Command]:
        commands = self.scheduler.on_timer(now)
        if self._next_sweep is not None and now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            commands.extend(self._hosts.sweep(now))
            self.cluster.forget_idle_tasks(failed_before=now - self.config.seed_failure_ttl_s)
        return commands

    def stat_task(self, task_id: str) -> TaskView | None:
        return self.cluster.stat(task_id)

    def has_host(self, host_id: str) -> bool:
        return host_id in self.cluster.hosts

    def seed_control_endpoint(self, host_id: str) -> tuple[str, int] | None:
        """(ip, control port) of the host while it is a connected seed (one it may trigger), else None."""
        host = self.cluster.hosts.get(host_id)
        if host is None or not host.info.seed or host.disconnected:
            return None
        return host.info.ip, host.info.control_port

    # --- peer events ----------------------------------------------------------------------------------

    def _registered(self, event: PeerRegistered, now: float) -> list[Command]:
        host = self.cluster.hosts.get(event.host_id)
        if host is None:
            return [ClosePeer(event.peer_id, f"host {event.host_id} has not announced itself")]
        commands: list[Command] = []
        old = self.cluster.peers.get(event.peer_id)
        if old is not None:
            commands.extend(self.after_removal(self.cluster.remove_peer(old, PeerState.LEAVE), now))
        task = self.cluster.task(event.task_id, event.download)
        peer = Peer(event.peer_id, task.task_id, host.host_id, event.download)
        peer.is_seed = event.download.need_back_to_source and host.info.seed  # only a triggered seed
        self.cluster.add_peer(peer, task, host)
        peer.move_to(PeerState.RECEIVED)
        if peer.is_seed:
            task.seed_trigger_pending = False
        commands.extend(self.scheduler.start_round(peer, task, now))
        return commands

    def _back_to_source_started(
        self, peer: Peer, task: Task, event: BackToSourceStarted, now: float
    ) -> list[Command]:
        if peer.state not in (PeerState.RECEIVED, PeerState.RUNNING, PeerState.BACK_TO_SOURCE):
            return []
        layout = TaskLayout(event.content_length, event.piece_length, event.response_headers)
        if not self.cluster.set_layout(task, layout):
            assert task.layout is not None
            description = (
                f"origin layout {event.content_length}/{event.piece_length} differs from the task's "
                f"{task.layout.content_length}/{task.layout.piece_length}"
            )
            return self._fail_peer(peer, description, now)
        assert task.layout is not None
        if not same_object(task.layout.response_headers, layout.response_headers):
            self._object_changed(task, layout, peer)
        elif not task.layout.response_headers:  # fixed by a held copy's announcement: these come first
            task.layout = layout
        peer.object_version = task.object_version
        if task.publisher_id is None:
            task.publisher_id = peer.peer_id
        if not peer.reads_origin:  # the peer went to the origin on its own (e.g. scheduler too slow)
            self.scheduler.mark_origin_reader(peer, task, now)
        peer.move_to(PeerState.BACK_TO_SOURCE)
        task.parent_pool.add(peer.peer_id)
        if task.state is not TaskState.SUCCEEDED:
            task.state = TaskState.RUNNING
        return self.scheduler.schedule_waiting(task, now)

    def _object_changed(self, task: Task, layout: TaskLayout, reader: Peer) -> None:
        """A new origin reader found another object than the task's: start the reference over from it.
        The old object's whole copies and readers are no parents any more; its readers are not the
        task's source either (others may be sent to the origin), and are judged like children."""
        task.object_version += 1
        reader.object_version = task.object_version
        task.layout = layout
        task.published_digests.clear()
        task.publisher_id = None
        for peer in task.peers.values():
            if not of_current_object(peer, task):
                task.parent_pool.discard(peer.peer_id)
                task.origin_readers.discard(peer.peer_id)
                task.seed_readers.discard(peer.peer_id)

    def _pieces_finished(self, peer: Peer, task: Task, event: PiecesFinished, now: float) -> list[Command]:
        commands: list[Command] = []
        current = peer.object_version == task.object_version
        if peer.reads_origin and current and publish(task, event.pieces):
            commands.extend(self._recheck_verdicts(task))
        for piece in event.pieces:
            if piece.cost_s > 0 and (parent := task.peers.get(piece.parent_id)) is not None:
                if parent.served_costs is None:
                    parent.served_costs = PieceCosts()
                parent.served_costs.record(piece.cost_s)
        if event.pieces:
            task.progress_at = now
        first_pieces = peer.finished_piece_count == 0 and bool(event.pieces)
        peer.finished_piece_count += len(event.pieces)
        if peer.state is PeerState.RECEIVED:
            peer.move_to(PeerState.RUNNING)
        if first_pieces and peer.active and of_current_object(peer, task):
            task.parent_pool.add(peer.peer_id)
            commands.extend(self.scheduler.schedule_waiting(task, now))
            commands.extend(self.scheduler.push_new_parent(peer, task, now))
        return commands

    def _finished(self, peer: Peer, task: Task, event: PeerFinished, now: float) -> list[Command]:
        count, reported = task.expected_piece_count(), len(event.piece_digests)
        reads_origin = peer.reads_origin or peer.state is PeerState.BACK_TO_SOURCE
        if reads_origin and peer.object_version != task.object_version:
            # it read an object that has changed since: judged like a child (its pieces may be stale)
            reads_origin = peer.reads_origin = False
            task.origin_readers.discard(peer.peer_id)
            task.seed_readers.discard(peer.peer_id)
        # An origin reader lists every piece of the layout it reported; nobody lists more than the layout
        # has (one message of zeros must not grow the task by millions of digests). A child may finish
        # before any layout is known here (this scheduler restarted): it is judged as usual.
        if reads_origin:
            malformed = count is None or reported != count
        else:
            malformed = count is not None and reported > count
        if malformed:
            task_size = "no layout" if count is None else f"{count} pieces"
            return self._fail_peer(
                peer, f"finished with {reported} piece digests; the task has {task_size}", now
            )
        if reads_origin:
            publish_all(task, event.piece_digests)
            self._succeed(peer, task, len(event.piece_digests))
            return [SendFinishVerdict(peer.peer_id, accepted=True), *self._recheck_verdicts(task)]
        peer.finish_digests = event.piece_digests
        task.hungry.discard(peer.peer_id)
        task.pending_verdicts.add(peer.peer_id)
        return self._recheck_verdicts(task)

    def _failed(self, peer: Peer, task: Task, event: PeerFailed, now: float) -> list[Command]:
        if event.source_error is not None and (peer.reads_origin or event.back_to_source):
            return self._origin_failed(peer, task, event)
        removed = self.cluster.remove_peer(peer, PeerState.FAILED)
        return self.after_removal(removed, now)

    def _reschedule(self, peer: Peer, task: Task, event: RescheduleRequested, now: float) -> list[Command]:
        # Only parents of this task count: a report cannot grow without bound or suspend unrelated hosts.
        unreachable = [p for p in event.unreachable if p in task.peers]
        corrupt = [p for p in event.corrupt if p in task.peers]
        peer.blocked.update(p for p in event.blocked if p in task.peers)
        peer.blocked.update(unreachable)
        peer.blocked.update(corrupt)
        commands: list[Command] = []
        for parent_id in unreachable:
            commands.extend(self._hosts.report_unreachable(parent_id, peer, now))
        for parent_id in corrupt:
            commands.extend(self._hosts.report_corrupt(parent_id, peer, now))
        if event.more_parents:
            return [*commands, *self.scheduler.offer_more(peer, task, now)]
        if peer.reads_origin or not peer.active or peer.waiting:
            return commands
        return [*commands, *self.scheduler.start_round(peer, task, now)]

    def _seed_trigger_failed(self, event: SeedTriggerFailed, now: float) -> list[Command]:
        seed = self.cluster.hosts.get(event.seed_host_id)
        if event.unreachable and seed is not None:
            # A hung or cut-off seed is tried for no other task (each would wait out the call's timeout)
            # and offered as no parent until it announces again or the suspension ends.
            seed.unreachable_until = now + self.config.unreachable_suspend_s
        task = self.cluster.tasks.get(event.task_id)
        if task is None or task.seed_readers:
            return []
        task.seed_trigger_pending = False
        task.seed_failed_at = now
        return [*self.scheduler.schedule_waiting(task, now), *self.scheduler.source_lost(task, now)]

    # --- shared by peer and host events --------------------------------------------------------------

    def after_removal(self, removed: RemovedPeer, now: float) -> list[Command]:
        """React to a peer gone: a lost seed is remembered; a lost origin reader is replaced (by a waiting
        peer, else by the running peer holding most pieces when nobody holds the task whole); a lost
        whole holder is replaced the same way once nobody else holds the task whole."""
        task = removed.task
        if removed.was_unfinished_seed:
            task.seed_failed_at = now
        if not removed.was_origin_reader and not removed.was_unfinished_seed:
            return self.scheduler.source_lost(task, now) if removed.was_whole_holder else []
        commands = self.scheduler.schedule_waiting(task, now)
        commands.extend(self.scheduler.source_lost(task, now))
        return [*commands, *self._recheck_verdicts(task)]

    def _fail_peer(self, peer: Peer, description: str, now: float) -> list[Command]:
        removed = self.cluster.remove_peer(peer, PeerState.FAILED)
        return [SendTaskFailed(peer.peer_id, description), *self.after_removal(removed, now)]

    def _origin_failed(self, reporter: Peer, task: Task, event: PeerFailed) -> list[Command]:
        self.cluster.remove_peer(reporter, PeerState.FAILED)
        error = event.source_error
        reader = self.cluster.hosts.get(reporter.host_id)
        if error is not None and reader is not None:  # whose trust store, DNS and routes decided it
            kind = "seed peer" if reader.info.seed else "peer"
            where = f"{kind} {reader.info.hostname or reader.host_id}"
            error = dataclasses.replace(error, message=f"{error.message} (the origin was read by {where})")
        commands: list[Command] = []
        for peer in list(task.peers.values()):
            if peer.active:
                self.cluster.remove_peer(peer, PeerState.FAILED)
                commands.append(SendTaskFailed(peer.peer_id, event.description, error))
        task.state = TaskState.FAILED
        task.seed_trigger_pending = False
        return commands

    def _succeed(self, peer: Peer, task: Task, piece_count: int) -> None:
        peer.move_to(PeerState.SUCCEEDED)
        peer.object_version = task.object_version
        make_root(peer, task, self.cluster.hosts)
        peer.reads_origin = False
        peer.finish_digests = None
        peer.waiting = False
        peer.retry_at = None
        task.waiting.pop(peer.peer_id, None)
        peer.finished_piece_count = max(peer.finished_piece_count, piece_count)
        task.origin_readers.discard(peer.peer_id)
        task.seed_readers.discard(peer.peer_id)
        task.pending_verdicts.discard(peer.peer_id)
        task.parent_pool.add(peer.peer_id)
        task.state = TaskState.SUCCEEDED

    def _recheck_verdicts(self, task: Task) -> list[Command]:
        """The publication grew: deferred verdicts, and whole copies announced after a change, again."""
        for peer_id in sorted(task.announced_pending):
            peer = task.peers[peer_id]
            assert peer.announced_digests is not None
            if holds_current_object(task, peer.announced_digests):
                task.announced_pending.discard(peer_id)
                peer.announced_digests = None
                peer.object_version = task.object_version
                if not self.cluster.hosts[peer.host_id].disconnected:
                    task.parent_pool.add(peer_id)
        commands: list[Command] = []
        readers_running = bool(task.origin_readers)
        for peer_id in sorted(task.pending_verdicts):
            peer = task.peers[peer_id]
            assert peer.finish_digests is not None
            digests = peer.finish_digests
            verdict = judge(digests, task.published_digests, task.expected_piece_count(), readers_running)
            if verdict is None:
                continue
            task.pending_verdicts.discard(peer_id)
            peer.finish_digests = None
            if verdict.accepted:
                self._succeed(peer, task, len(digests))
            commands.append(SendFinishVerdict(peer_id, verdict.accepted, verdict.bad_pieces))
        return commands
