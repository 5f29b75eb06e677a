"""Host events of the engine: announce (new boot, finished tasks), keepalive, disconnect, leave, and
children's unreachable reports; the periodic sweep for silent and long-gone hosts.

Rules: a dropped keepalive stream suspends the host at once, and so does one silent for `host_silence_s`;
its peers leave the parent pools (so samples are not wasted on them) until a keepalive or announce lifts
that. A host disconnected for `host_ttl_s` is forgotten with its peers. Enough distinct child hosts
reporting a host unreachable suspend it for `unreachable_suspend_s` (an announce lifts it), and as many
reporting corrupt pieces from it for `corrupt_suspend_s`. A host suspended in any of these ways may have
held a task's last full copy: the scheduler looks whether a running peer must read the rest
(scheduling.py). A new boot id drops every peer of the old boot. A finished task in an announce becomes a
SUCCEEDED peer (layout and digests only), and waiting peers of that task are scheduled at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dfly.common.pieces import piece_count
from dfly.scheduler.core.cluster import Cluster, RemovedPeer, holds_whole, of_current_object
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.messages import (
    ClosePeer,
    Command,
    FinishedTask,
    HostAnnounced,
    HostDisconnected,
    HostKeepAlive,
    HostLeft,
    TaskDeleted,
    TaskLayout,
)
from dfly.scheduler.core.model import Host, Peer, PeerState, Task, TaskState
from dfly.scheduler.core.scheduling import ParentScheduler
from dfly.scheduler.core.verdicts import holds_current_object, publish_all

AfterRemoval = Callable[[RemovedPeer, float], list[Command]]
RecheckVerdicts = Callable[[Task], list[Command]]


class HostHandlers:
    def __init__(
        self,
        config: EngineConfig,
        cluster: Cluster,
        scheduler: ParentScheduler,
        after_removal: AfterRemoval,
        recheck_verdicts: RecheckVerdicts,
    ) -> None:
        self._config = config
        self._cluster = cluster
        self._scheduler = scheduler
        self._after_removal = after_removal
        self._recheck_verdicts = recheck_verdicts

    def announced(self, event: HostAnnounced, now: float) -> list[Command]:
        info = event.host
        host = self._cluster.hosts.get(info.host_id)
        # Only a host coming back (new, disconnected, suspended) makes its peers' tasks worth a new look:
        # a connected host announcing again (its next chunk of tasks, a seed trigger's) changes nothing
        # for them, and looking would cost O(all its peers) per announce.
        coming_back = host is None or host.is_suspended(now)
        commands: list[Command] = []
        if host is not None and info.boot_id and host.info.boot_id and info.boot_id != host.info.boot_id:
            commands.extend(self._drop_peers(host, f"host {info.host_id} restarted", now))
            host.upload_rate_bytes_per_s = 0.0
            host.upload_slots_in_use = 0
        if host is None:
            host = Host(info)
            self._cluster.hosts[info.host_id] = host
        host.info = info
        self._reconnected(host)
        host.unreachable_until = -math.inf
        host.unreachable_reporters.clear()
        if info.seed:
            self._cluster.seed_host_ids.add(info.host_id)
        else:
            self._cluster.seed_host_ids.discard(info.host_id)
        touched = self._tasks_offered_by(host) if coming_back else {}
        for finished in event.finished_tasks:
            held = self._finished_peer(host, finished.task_id)
            if held is not None and held != finished.peer_id:
                continue  # one parent per host and task: e.g. a reconnect after a download seen to finish
            task = self._register_finished(host, finished)
            if task is not None:
                touched[task.task_id] = task
        for task in touched.values():
            commands.extend(self._scheduler.schedule_waiting(task, now))
            commands.extend(self._recheck_verdicts(task))
        return commands

    def keepalive(self, event: HostKeepAlive, now: float) -> list[Command]:
        host = self._current_host(event.host_id, event.boot_id)
        if host is None:
            return []
        host.last_keepalive_at = now
        host.upload_rate_bytes_per_s = max(0.0, event.upload_rate_bytes_per_s)
        host.upload_slots_in_use = max(0, event.upload_slots_in_use)
        if not host.disconnected:
            return []
        self._reconnected(host)
        commands: list[Command] = []
        for task in self._tasks_offered_by(host).values():
            commands.extend(self._scheduler.schedule_waiting(task, now))
        return commands

    def disconnected(self, event: HostDisconnected, now: float) -> list[Command]:
        host = self._current_host(event.host_id, event.boot_id)
        return [] if host is None else self._disconnect(host, now)

    def sweep(self, now: float) -> list[Command]:
        """Suspend hosts whose keepalive stream went silent; forget hosts disconnected for host_ttl_s."""
        commands: list[Command] = []
        for host in list(self._cluster.hosts.values()):
            if host.disconnected:
                gone_since = host.disconnected_at
                if gone_since is not None and now - gone_since >= self._config.host_ttl_s:
                    commands.extend(self.left(HostLeft(host.host_id), now))
            elif (
                host.last_keepalive_at is not None
                and now - host.last_keepalive_at >= self._config.host_silence_s
            ):
                commands.extend(self._disconnect(host, now))
        return commands

    def left(self, event: HostLeft, now: float) -> list[Command]:
        host = self._cluster.hosts.get(event.host_id)
        if host is None:
            return []
        host.disconnected = True  # nothing of this host is offered while its peers are dropped
        commands = self._drop_peers(host, f"host {event.host_id} left", now)
        del self._cluster.hosts[event.host_id]
        self._cluster.seed_host_ids.discard(event.host_id)
        return commands

    def task_deleted(self, event: TaskDeleted, now: float) -> list[Command]:
        """Forget the host's peers of the task that are done (a running download reports for itself):
        the host is no longer offered as a parent for it."""
        host = self._cluster.hosts.get(event.host_id)
        if host is None:
            return []
        removals: list[RemovedPeer] = []
        for peer_id in sorted(host.peers_by_task.get(event.task_id, ())):
            peer = self._cluster.peers[peer_id]
            if not peer.active:
                removals.append(self._cluster.remove_peer(peer, PeerState.LEAVE))
        commands: list[Command] = []
        for removed in removals:
            commands.extend(self._after_removal(removed, now))
        return commands

    def report_unreachable(self, parent_id: str, child: Peer, now: float) -> list[Command]:
        """After `unreachable_reports` distinct hosts could not reach this parent, its host is offered to
        nobody for `unreachable_suspend_s`."""
        host = self._reported_by_quorum(
            parent_id, child, lambda h: h.unreachable_reporters, self._config.unreachable_reports
        )
        if host is None:
            return []
        was_usable = not host.is_suspended(now)
        host.unreachable_until = now + self._config.unreachable_suspend_s
        return self._holdings_cut_off(host, now) if was_usable else []

    def report_corrupt(self, parent_id: str, child: Peer, now: float) -> list[Command]:
        """A child got a piece failing its CRC from this parent: after `corrupt_reports` distinct hosts
        said so, its host is offered to nobody for `corrupt_suspend_s` (a bad disk or memory)."""
        host = self._reported_by_quorum(
            parent_id, child, lambda h: h.corrupt_reporters, self._config.corrupt_reports
        )
        if host is None:
            return []
        was_usable = not host.is_suspended(now)
        host.corrupt_until = now + self._config.corrupt_suspend_s
        return self._holdings_cut_off(host, now) if was_usable else []

    def _reported_by_quorum(
        self, parent_id: str, child: Peer, reporters_of: Callable[[Host], set[str]], quorum: int
    ) -> Host | None:
        """Count the child's host among the parent host's reporters; the host once `quorum` distinct
        hosts reported it (the count then starts again), else None."""
        parent = self._cluster.peers.get(parent_id)
        host = self._cluster.hosts.get(parent.host_id) if parent is not None else None
        if host is None or host.host_id == child.host_id:
            return None
        reporters = reporters_of(host)
        reporters.add(child.host_id)
        if len(reporters) < quorum:
            return None
        reporters.clear()
        return host

    # --- helpers --------------------------------------------------------------------------------------

    def _disconnect(self, host: Host, now: float) -> list[Command]:
        """Offer nothing of the host until it is back (its peers leave the parent pools)."""
        if host.disconnected:
            return []
        host.disconnected = True
        host.disconnected_at = now
        for peer_id in host.peer_ids:
            peer = self._cluster.peers[peer_id]
            self._cluster.tasks[peer.task_id].parent_pool.discard(peer_id)
        return self._holdings_cut_off(host, now)

    def _holdings_cut_off(self, host: Host, now: float) -> list[Command]:
        """The host serves nobody now: each task it held whole may have lost its last full copy (the
        scheduler looks again once the task's peers stop making progress; scheduling.py)."""
        commands: list[Command] = []
        for task_id in sorted(host.peers_by_task):
            task = self._cluster.tasks[task_id]
            held = any(holds_whole(self._cluster.peers[p]) for p in host.peers_by_task[task_id])
            if held and len(task.peers) > 1:  # nobody else in the task: nobody to serve
                commands.extend(self._scheduler.source_lost(task, now))
        return commands

    def _reconnected(self, host: Host) -> None:
        """The host is back: its peers that can serve pieces are offered again."""
        if not host.disconnected:
            return
        host.disconnected = False
        host.disconnected_at = None
        for peer_id in sorted(host.peer_ids):
            peer = self._cluster.peers[peer_id]
            task = self._cluster.tasks[peer.task_id]
            serves = peer.state in (PeerState.SUCCEEDED, PeerState.BACK_TO_SOURCE) or (
                peer.active and peer.finished_piece_count > 0
            )
            if serves and of_current_object(peer, task):
                task.parent_pool.add(peer_id)

    def _current_host(self, host_id: str, boot_id: str) -> Host | None:
        host = self._cluster.hosts.get(host_id)
        if host is None or (boot_id and host.info.boot_id and boot_id != host.info.boot_id):
            return None
        return host

    def _finished_peer(self, host: Host, task_id: str) -> str | None:
        """The id of this host's finished peer of the task, if it has one (the lowest, if several)."""
        for peer_id in sorted(host.peers_by_task.get(task_id, ())):
            if self._cluster.peers[peer_id].state is PeerState.SUCCEEDED:
                return peer_id
        return None

    def _tasks_offered_by(self, host: Host) -> dict[str, Task]:
        tasks: dict[str, Task] = {}
        for peer_id in sorted(host.peer_ids):
            peer = self._cluster.peers[peer_id]
            task = self._cluster.tasks[peer.task_id]
            if peer_id in task.parent_pool and task.waiting:
                tasks[task.task_id] = task
        return tasks

    def _drop_peers(self, host: Host, reason: str, now: float) -> list[Command]:
        commands: list[Command] = []
        removals: list[RemovedPeer] = []
        for peer_id in sorted(host.peer_ids):
            peer = self._cluster.peers[peer_id]
            if peer.active:
                commands.append(ClosePeer(peer_id, reason))
            removals.append(self._cluster.remove_peer(peer, PeerState.LEAVE))
        for removed in removals:
            commands.extend(self._after_removal(removed, now))
        return commands

    def _register_finished(self, host: Host, finished: FinishedTask) -> Task | None:
        existing = self._cluster.peers.get(finished.peer_id)
        if existing is not None:
            if existing.host_id != host.host_id:
                return None  # another host's peer: never moved to the host that names it
            if existing.active:
                return None  # a live download reports for itself on its stream
            self._cluster.remove_peer(existing, PeerState.LEAVE)
        digests = len(finished.piece_digests)
        if digests and digests != piece_count(finished.content_length, finished.piece_length):
            return None  # not a list of this layout's pieces
        # No download spec from a held task: its URL is shown without user info or query, and a seed
        # trigger must carry what a live requester sent (its URL, its Authorization), not a stale copy.
        task = self._cluster.task(finished.task_id, None)
        if not self._cluster.set_layout(task, TaskLayout(finished.content_length, finished.piece_length)):
            return None  # another layout: its pieces would be refused by every child
        peer = Peer(finished.peer_id, task.task_id, host.host_id)
        self._cluster.add_peer(peer, task, host)
        peer.move_to(PeerState.SUCCEEDED)
        if host.info.seed:
            task.seed_trigger_pending = False  # a triggered seed that held it already answers this way
        peer.finished_piece_count = len(finished.piece_digests) or (task.expected_piece_count() or 0)
        task.state = TaskState.SUCCEEDED
        if task.object_version == 0:
            task.parent_pool.add(peer.peer_id)
            if not task.published_digests:  # nothing says which object it holds
                publish_all(task, finished.piece_digests)
        elif holds_current_object(task, finished.piece_digests):
            # The object changed since the task began; an announcement names no validators, so only
            # digests that agree with the new reference make this copy a parent (else a host holding
            # the old object came back into the pool on every reconnect).
            peer.object_version = task.object_version
            task.parent_pool.add(peer.peer_id)
        elif finished.piece_digests:  # judged again as the publication grows (engine._recheck_verdicts)
            peer.announced_digests = finished.piece_digests
            task.announced_pending.add(peer.peer_id)
        return task
