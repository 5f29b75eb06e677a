"""Parent choice and the retry / back-to-source / seed-trigger decisions for one waiting peer.

One attempt: sample up to `filter_parent_limit` peers of the task's parent pool (O(sample)), drop what
the filters reject, rank with the evaluator, hand out the best `candidate_parent_limit`. When nothing
fits and nobody is bringing the task's data (no seed on its way, no origin reader), trigger a seed
(consistent hash of the task id over healthy seeds) or, without one, send this peer to the origin now;
a peer on a seed host (a download through a seed's own proxy) goes to the origin itself, as in Dragonfly.
Counted attempts (register, reschedule, fallback timer) move toward the origin after
`retry_back_to_source_limit` and toward failure after `retry_limit`; attempts made because a parent just
became usable are free, and so is waiting while a triggered seed or an origin reader has not yet fixed
the task's layout (a slow origin must not send every child to it).
Timers, each in a heap: a waiting peer's retry; the check, `source_return_s` after a task's origin reader
or a peer holding it whole went (or its host was cut off), whether a running peer must read the rest;
and the check whether a triggered seed registered within `seed_register_timeout_s` (if not, it counts
as failed for the task and a waiting peer reads the origin).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random

from dfly.scheduler.core.cluster import Cluster, holds_whole, of_current_object, seed_download
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.evaluator import rank_parents
from dfly.scheduler.core.filters import FilterContext, rejection_reason
from dfly.scheduler.core.graph import add_parents, drop_parents, make_root, set_parents
from dfly.scheduler.core.messages import (
    CandidateParent,
    Command,
    SendBackToSource,
    SendCandidateParents,
    SendTaskFailed,
    TriggerSeedPeer,
)
from dfly.scheduler.core.model import Host, Peer, PeerState, Task, TaskState


def seed_rank(task_id: str, host_id: str) -> bytes:
    """Rendezvous-hash weight: the healthy seed with the largest value serves the task."""
    return hashlib.sha256(f"{task_id}\0{host_id}".encode()).digest()


def pick_seed_host(task_id: str, seeds: list[Host]) -> Host | None:
    """Consistent choice of a seed for a task; removing another seed never moves the task."""
    return max(seeds, key=lambda host: seed_rank(task_id, host.host_id), default=None)


class ParentScheduler:
    def __init__(
        self, config: EngineConfig, rng: random.Random, cluster: Cluster, started_at: float | None = None
    ) -> None:
        self._config = config
        self._rng = rng
        self._cluster = cluster
        # None (simulations, tests): no start-up grace; see EngineConfig.startup_grace_s
        self._grace_until = -math.inf if started_at is None else started_at + config.startup_grace_s
        self._retries: list[tuple[float, int, str]] = []
        self._source_checks: list[tuple[float, int, str]] = []  # (when, seq, task id): replace_lost_source
        self._source_check_due: dict[str, float] = {}  # task id -> when its pending look is due
        self._seed_checks: list[tuple[float, int, str, float]] = []  # (when, seq, task id, triggered at)
        self._sequence = itertools.count()

    # --- entry points ---------------------------------------------------------------------------------

    def start_round(self, peer: Peer, task: Task, now: float) -> list[Command]:
        """The peer needs parents (register, reschedule): a fresh round of counted attempts."""
        drop_parents(peer, task, self._cluster.hosts)  # the child said they no longer serve it
        peer.attempts = 0
        peer.waiting = True
        task.waiting[peer.peer_id] = None
        return self.attempt(peer, task, now, counted=True)

    def schedule_waiting(self, task: Task, now: float) -> list[Command]:
        """A parent may have become usable, or the data source changed: retry every waiting peer."""
        commands: list[Command] = []
        for peer_id in list(task.waiting):
            peer = task.peers.get(peer_id)
            if peer is not None and peer.waiting:
                commands.extend(self.attempt(peer, task, now, counted=False))
        return commands

    def source_lost(self, task: Task, now: float) -> list[Command]:
        """The task may have lost its source (its origin reader, or a peer holding it whole, gone or on a
        host now disconnected or suspended): look again now, or after `source_return_s` (it may return).
        At most one look per task is pending."""
        if self._config.source_return_s <= 0:
            return self.replace_lost_source(task, now)
        self._arm_source_check(task.task_id, now + self._config.source_return_s)
        return []

    def replace_lost_source(self, task: Task, now: float) -> list[Command]:
        """Nobody reads the origin, nobody on a usable host holds the task whole, and the task's peers
        reported no new piece for `source_return_s` (they have traded what they hold among themselves):
        the running peer holding most pieces reads the rest (else they wait on each other for ever).
        When none of them may read the origin, a seed is triggered; without one they fail."""
        if task.origin_readers or task.seed_trigger_pending or task.layout is None:
            return []
        sources = [p for p in task.peers.values() if not self._is_leech(p)]  # a leech serves nobody
        if any(
            holds_whole(p) and of_current_object(p, task) and self._on_usable_host(p, now) for p in sources
        ):
            return []
        running = [p for p in task.peers.values() if p.active and not p.waiting and not p.reads_origin]
        if not running:
            return []
        quiet_at = task.progress_at + self._config.source_return_s
        if now < quiet_at:  # still trading pieces (or a holder on a cut-off host still serves): later
            self._arm_source_check(task.task_id, quiet_at)
            return []
        description = "the task's source is gone: read the missing pieces from the origin"
        runners = [p for p in running if not self._is_leech(p) and self.may_read_origin(p, task)]
        if runners:
            chosen = max(runners, key=lambda peer: (peer.finished_piece_count, peer.peer_id))
            return self.send_to_origin(chosen, task, description, now)
        commands: list[Command] = []
        stuck: list[Peer] = []
        for peer in sorted(running, key=lambda p: p.peer_id):
            if self._is_leech(peer) and self.may_read_origin(peer, task):
                commands.extend(self.send_to_origin(peer, task, description, now))  # for itself only
            else:
                stuck.append(peer)
        if not stuck:
            return commands
        trigger = self._trigger_seed(task, stuck[0], now)
        if trigger is not None:
            return [*commands, trigger]
        for peer in stuck:
            self._cluster.remove_peer(peer, PeerState.FAILED)
            failure = "the task's source is gone, no seed peer can read it and back-to-source is disabled"
            commands.append(SendTaskFailed(peer.peer_id, failure))
        return commands

    def offer_more(self, peer: Peer, task: Task, now: float) -> list[Command]:
        """The child has working parents and wants more: new ones if any, otherwise no answer."""
        if not peer.active or peer.waiting or peer.reads_origin or task.layout is None:
            return []
        parents = self.find_parents(peer, task, now, exclude=frozenset(peer.parent_ids))
        if not parents:
            return []
        add_parents(peer, parents, task, self._cluster.hosts, keep=self._config.candidate_parent_limit)
        self._track_hunger(peer, task)
        return [SendCandidateParents(peer.peer_id, task.layout, self._describe(parents))]

    def push_new_parent(self, parent: Peer, task: Task, now: float) -> list[Command]:
        """A peer just became usable: offer it to a few children holding fewer parents than allowed."""
        parent_host = self._cluster.hosts.get(parent.host_id)
        if parent_host is None or task.layout is None:
            return []
        commands: list[Command] = []
        limit = self._config.candidate_parent_limit
        for child_id in task.hungry.sample(self._rng, self._config.push_fanout):
            child = task.peers.get(child_id)
            if child is None or not child.active or child.waiting or child.reads_origin:
                task.hungry.discard(child_id)
                continue
            child_host = self._cluster.hosts.get(child.host_id)
            if child_id == parent.peer_id or parent.peer_id in child.parent_ids or child_host is None:
                continue
            context = FilterContext(child, child_host, now, dag=self._config.topology == "dag")
            if rejection_reason(context, parent, parent_host) is not None:
                continue
            add_parents(child, [parent], task, self._cluster.hosts, keep=limit)
            self._track_hunger(child, task)
            commands.append(SendCandidateParents(child_id, task.layout, self._describe([parent])))
        return commands

    def _track_hunger(self, child: Peer, task: Task) -> None:
        if len(child.parent_ids) < self._config.candidate_parent_limit:
            task.hungry.add(child.peer_id)
        else:
            task.hungry.discard(child.peer_id)

    def next_deadline(self) -> float | None:
        checks = (self._next_retry(), self._next_source_check(), self._next_seed_check())
        deadlines = [at for at in checks if at is not None]
        return min(deadlines, default=None)

    def on_timer(self, now: float) -> list[Command]:
        commands: list[Command] = []
        while (at := self._next_seed_check()) is not None and at <= now:
            _, _, task_id, _ = heapq.heappop(self._seed_checks)
            unanswered = self._cluster.tasks[task_id]
            unanswered.seed_trigger_pending = False  # accepted, never registered: as if the trigger failed
            unanswered.seed_failed_at = now
            commands.extend(self.schedule_waiting(unanswered, now))
            commands.extend(self.source_lost(unanswered, now))
        while (at := self._next_source_check()) is not None and at <= now:
            _, _, task_id = heapq.heappop(self._source_checks)
            due = self._source_check_due.pop(task_id, at)
            if due > now:  # armed again for later since this entry was pushed
                self._source_check_due[task_id] = due
                heapq.heappush(self._source_checks, (due, next(self._sequence), task_id))
                continue
            task = self._cluster.tasks.get(task_id)
            if task is not None:
                commands.extend(self.replace_lost_source(task, now))
        while (at := self._next_retry()) is not None and at <= now:
            _, _, peer_id = heapq.heappop(self._retries)
            peer = self._cluster.peers[peer_id]
            peer.retry_at = None
            commands.extend(self.attempt(peer, self._cluster.tasks[peer.task_id], now, counted=True))
        return commands

    def _next_retry(self) -> float | None:
        """When the earliest still-armed retry is due (stale heap entries are dropped on the way)."""
        while self._retries:
            at, _, peer_id = self._retries[0]
            peer = self._cluster.peers.get(peer_id)
            if peer is not None and peer.waiting and peer.retry_at == at:
                return at
            heapq.heappop(self._retries)
        return None

    def _next_seed_check(self) -> float | None:
        """When the earliest trigger still waiting for its seed times out (answered ones are dropped)."""
        while self._seed_checks:
            at, _, task_id, triggered_at = self._seed_checks[0]
            task = self._cluster.tasks.get(task_id)
            if task is not None and task.seed_trigger_pending and task.source_requested_at == triggered_at:
                return at
            heapq.heappop(self._seed_checks)
        return None

    def _next_source_check(self) -> float | None:
        return self._source_checks[0][0] if self._source_checks else None

    # --- one attempt ----------------------------------------------------------------------------------

    def attempt(self, peer: Peer, task: Task, now: float, *, counted: bool) -> list[Command]:
        if peer.is_seed:
            return self.send_to_origin(peer, task, "seed peer: read the task from the origin", now)
        asked = peer.download is not None and peer.download.need_back_to_source
        if asked and self.may_read_origin(peer, task):  # e.g. an origin reader registering again
            return self.send_to_origin(peer, task, "the peer asked to read the origin", now)
        parents = self.find_parents(peer, task, now)
        if parents:
            return [self._hand_out(peer, task, parents)]
        commands: list[Command] = []
        if not task.seed_trigger_pending and not task.origin_readers:
            if self._on_seed_host(peer) and self.may_read_origin(peer, task):
                # Dragonfly's rule: a download on a seed host (e.g. through its proxy) is the task's root
                # itself; it neither triggers another seed nor waits for one after a restart.
                return self.send_to_origin(
                    peer, task, "the peer runs on a seed host: read the task from the origin", now
                )
            trigger = self._trigger_seed(task, peer, now)
            if trigger is not None:
                commands.append(trigger)
            elif now < self._grace_until and task.seed_failed_at is None:
                # Just started and no seed host known yet: hosts and running downloads are re-announcing.
                self._arm_retry(peer, min(self._grace_until, now + self._config.retry_interval_s))
                return commands
            elif self.may_read_origin(peer, task):
                return self.send_to_origin(
                    peer, task, "no seed peer serves the task: read it from the origin", now
                )
        if not counted:
            return commands
        if (
            task.layout is None
            and (task.seed_trigger_pending or task.origin_readers)
            and task.source_requested_at is not None
            and now - task.source_requested_at < self._config.source_start_timeout_s
        ):
            # The data is on its way (a seed was triggered, or an origin reader is stat-ing the origin):
            # waiting for it is not a failed attempt. Bounded by the seed-trigger timeout, the origin
            # reader's own failure and `source_start_timeout_s`.
            self._arm_retry(peer, now + self._config.retry_interval_s)
            return commands
        peer.attempts += 1
        if peer.attempts >= self._config.retry_back_to_source_limit and self.may_read_origin(peer, task):
            description = f"no parent after {peer.attempts} attempts: read the task from the origin"
            return [*commands, *self.send_to_origin(peer, task, description, now)]
        if peer.attempts >= self._config.retry_limit:
            return [*commands, self._give_up(peer, task)]
        self._arm_retry(peer, now + self._config.retry_interval_s)
        return commands

    def find_parents(
        self, child: Peer, task: Task, now: float, exclude: frozenset[str] = frozenset()
    ) -> list[Peer]:
        child_host = self._cluster.hosts.get(child.host_id)
        if child_host is None or task.layout is None:
            return []
        context = FilterContext(child, child_host, now, dag=self._config.topology == "dag")
        candidates: list[tuple[Peer, Host]] = []
        for peer_id in task.parent_pool.sample(self._rng, self._config.filter_parent_limit):
            candidate = task.peers.get(peer_id)
            host = self._cluster.hosts.get(candidate.host_id) if candidate is not None else None
            if candidate is None or host is None or peer_id in exclude:
                continue
            if rejection_reason(context, candidate, host) is None:
                candidates.append((candidate, host))
        ranked = rank_parents(candidates, child_host, self._config.weights)
        return [peer for peer, _ in ranked[: self._config.candidate_parent_limit]]

    def may_read_origin(self, peer: Peer, task: Task) -> bool:
        if peer.download is not None and peer.download.disable_back_to_source:
            return False
        return task.normal_origin_readers < self._config.back_to_source_limit

    def send_to_origin(self, peer: Peer, task: Task, description: str, now: float) -> list[Command]:
        self.mark_origin_reader(peer, task, now)
        return [SendBackToSource(peer.peer_id, description, task.layout)]

    def mark_origin_reader(self, peer: Peer, task: Task, now: float) -> None:
        """The peer reads the origin: no parents, no waiting, counted against back_to_source_limit."""
        self._stop_waiting(peer, task)
        make_root(peer, task, self._cluster.hosts)
        peer.reads_origin = True
        if self._is_leech(peer):
            return  # reads for itself only: not the task's source, not counted against the limit
        if not task.origin_readers and not task.seed_trigger_pending:
            task.source_requested_at = now
        task.origin_readers.add(peer.peer_id)
        if peer.is_seed:
            task.seed_readers.add(peer.peer_id)

    # --- helpers --------------------------------------------------------------------------------------

    def _arm_source_check(self, task_id: str, at: float) -> None:
        """One pending look per task, due at the latest time asked for (a loss just now gets its full
        `source_return_s`, even if an earlier loss armed a look sooner)."""
        due = self._source_check_due.get(task_id)
        if due is None:
            heapq.heappush(self._source_checks, (at, next(self._sequence), task_id))
        self._source_check_due[task_id] = at if due is None else max(due, at)

    def _on_usable_host(self, peer: Peer, now: float) -> bool:
        host = self._cluster.hosts.get(peer.host_id)
        return host is not None and not host.is_suspended(now)

    def _on_seed_host(self, peer: Peer) -> bool:
        host = self._cluster.hosts.get(peer.host_id)
        return host is not None and host.info.seed

    def _is_leech(self, peer: Peer) -> bool:
        host = self._cluster.hosts.get(peer.host_id)
        return host is not None and host.info.piece_port <= 0

    def _hand_out(self, child: Peer, task: Task, parents: list[Peer]) -> SendCandidateParents:
        assert task.layout is not None  # find_parents returns nothing without a layout
        self._stop_waiting(child, task)
        set_parents(child, parents, task, self._cluster.hosts)  # RUNNING once it says `started`
        self._track_hunger(child, task)
        if task.state is TaskState.PENDING:
            task.state = TaskState.RUNNING
        return SendCandidateParents(child.peer_id, task.layout, self._describe(parents))

    def _describe(self, parents: list[Peer]) -> tuple[CandidateParent, ...]:
        offered = []
        for parent in parents:
            info = self._cluster.hosts[parent.host_id].info
            offered.append(CandidateParent(parent.peer_id, info.host_id, info.ip, info.piece_port, info.seed))
        return tuple(offered)

    def _give_up(self, peer: Peer, task: Task) -> SendTaskFailed:
        self._stop_waiting(peer, task)
        self._cluster.remove_peer(peer, PeerState.FAILED)
        description = f"no parent available for task {task.task_id} after {peer.attempts} attempts"
        return SendTaskFailed(peer.peer_id, description)

    def _trigger_seed(self, task: Task, child: Peer, now: float) -> TriggerSeedPeer | None:
        if task.download is None:
            return None
        failed_at = task.seed_failed_at
        if failed_at is not None and now - failed_at < self._config.seed_failure_ttl_s:
            return None
        healthy = [
            host
            for host_id in sorted(self._cluster.seed_host_ids)
            if (host := self._cluster.hosts[host_id]).host_id != child.host_id and not host.is_suspended(now)
        ]
        seed = pick_seed_host(task.task_id, healthy)
        if seed is None:
            return None
        task.seed_trigger_pending = True
        task.seed_failed_at = None
        task.source_requested_at = now
        check = (now + self._config.seed_register_timeout_s, next(self._sequence), task.task_id, now)
        heapq.heappush(self._seed_checks, check)
        return TriggerSeedPeer(
            task.task_id, seed.host_id, seed.info.ip, seed.info.control_port, seed_download(task.download)
        )

    def _stop_waiting(self, peer: Peer, task: Task) -> None:
        peer.waiting = False
        peer.retry_at = None
        task.waiting.pop(peer.peer_id, None)

    def _arm_retry(self, peer: Peer, at: float) -> None:
        peer.retry_at = at
        heapq.heappush(self._retries, (at, next(self._sequence), peer.peer_id))
