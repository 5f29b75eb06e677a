"""All hosts, tasks and peers the engine knows, and the bookkeeping that keeps their indexes consistent.

Rules: every peer is in exactly one task and one host; a peer that fails or leaves is removed from every
index at once (it is never offered again and costs no memory); `remove_peer` reports whether the peer was
reading the origin, was the task's seed or held the task whole, so the engine can react. A task whose last
peer is gone is forgotten with its layout and digests (as Dragonfly's task GC does): the object behind its
URL may have changed by the time someone asks for it again. Only a seed's failure for it is kept, in an
idle task (no peers, nothing else known) that `forget_idle_tasks` drops once that failure no longer
counts. No policy lives here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dfly.scheduler.core.graph import drop_children, drop_parents
from dfly.scheduler.core.messages import DownloadSpec, TaskLayout
from dfly.scheduler.core.model import PEER_TRANSITIONS, Host, Peer, PeerState, Task, TaskState


@dataclass(frozen=True, slots=True)
class TaskView:
    """What StatTask reports."""

    task_id: str
    state: str
    content_length: int  # -1 while unknown
    piece_length: int  # 0 while unknown
    peer_count: int
    piece_digests: tuple[int, ...]  # the known prefix of the published digests, in piece order
    known_digests: int


@dataclass(frozen=True, slots=True)
class RemovedPeer:
    peer: Peer
    task: Task
    was_origin_reader: bool
    was_unfinished_seed: bool
    was_whole_holder: bool  # finished (or awaiting its verdict): it could serve every piece


@dataclass(slots=True, eq=False)
class Cluster:
    hosts: dict[str, Host] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    seed_host_ids: set[str] = field(default_factory=set)
    idle_task_ids: dict[str, None] = field(default_factory=dict)  # tasks kept only for a seed failure

    def task(self, task_id: str, download: DownloadSpec | None) -> Task:
        """The task, created on first use; a FAILED task starts over (layout and digests forgotten)."""
        task = self.tasks.get(task_id)
        if task is None:
            task = Task(task_id=task_id, download=download)
            self.tasks[task_id] = task
        elif task.state is TaskState.FAILED:
            _start_over(task)
        if task.download is None and download is not None:
            task.download = download
        return task

    def add_peer(self, peer: Peer, task: Task, host: Host) -> None:
        self.idle_task_ids.pop(task.task_id, None)
        self.peers[peer.peer_id] = peer
        task.peers[peer.peer_id] = peer
        host.peer_ids.add(peer.peer_id)
        host.peers_by_task.setdefault(task.task_id, set()).add(peer.peer_id)

    def remove_peer(self, peer: Peer, state: PeerState) -> RemovedPeer:
        """Move the peer to FAILED (LEAVE if it had succeeded) or LEAVE and forget it everywhere
        (O(its parents and children))."""
        task = self.tasks[peer.task_id]
        was_origin_reader = peer.reads_origin
        was_unfinished_seed = peer.is_seed and peer.state is not PeerState.SUCCEEDED
        was_whole_holder = holds_whole(peer)
        peer.move_to(state if state in PEER_TRANSITIONS[peer.state] else PeerState.LEAVE)
        drop_parents(peer, task, self.hosts)
        drop_children(peer, task, self.hosts)
        task.parent_pool.discard(peer.peer_id)
        task.hungry.discard(peer.peer_id)
        task.waiting.pop(peer.peer_id, None)
        task.origin_readers.discard(peer.peer_id)
        task.seed_readers.discard(peer.peer_id)
        task.pending_verdicts.discard(peer.peer_id)
        task.announced_pending.discard(peer.peer_id)
        peer.reads_origin = False
        peer.waiting = False
        peer.retry_at = None
        task.peers.pop(peer.peer_id, None)
        self.peers.pop(peer.peer_id, None)
        if not task.peers and self.tasks.get(task.task_id) is task:
            if task.seed_failed_at is None:
                del self.tasks[task.task_id]
            else:
                _start_over(task)
                self.idle_task_ids[task.task_id] = None
        host = self.hosts.get(peer.host_id)
        if host is not None:
            host.peer_ids.discard(peer.peer_id)
            of_task = host.peers_by_task.get(peer.task_id)
            if of_task is not None:
                of_task.discard(peer.peer_id)
                if not of_task:
                    del host.peers_by_task[peer.task_id]
        return RemovedPeer(peer, task, was_origin_reader, was_unfinished_seed, was_whole_holder)

    def forget_idle_tasks(self, failed_before: float) -> None:
        """Drop the idle tasks whose seed failure happened before `failed_before`."""
        for task_id in list(self.idle_task_ids):
            failed_at = self.tasks[task_id].seed_failed_at
            if failed_at is None or failed_at < failed_before:
                del self.idle_task_ids[task_id]
                del self.tasks[task_id]

    def set_layout(self, task: Task, layout: TaskLayout) -> bool:
        """Fix the task's layout if unknown; False when it is already fixed to another one."""
        if task.layout is None:
            task.layout = layout
            return True
        return (task.layout.content_length, task.layout.piece_length) == (
            layout.content_length,
            layout.piece_length,
        )

    def stat(self, task_id: str) -> TaskView | None:
        task = self.tasks.get(task_id)
        if task is None:
            return None
        prefix: list[int] = []
        while len(prefix) in task.published_digests:
            prefix.append(task.published_digests[len(prefix)])
        layout = task.layout or TaskLayout(content_length=-1, piece_length=0)
        return TaskView(
            task_id=task.task_id,
            state=task.state.value,
            content_length=layout.content_length,
            piece_length=layout.piece_length,
            peer_count=len(task.peers),
            piece_digests=tuple(prefix),
            known_digests=len(task.published_digests),
        )


def holds_whole(peer: Peer) -> bool:
    """Finished, or finished and awaiting its digest verdict: the peer can serve every piece."""
    return peer.state is PeerState.SUCCEEDED or peer.finish_digests is not None


def of_current_object(peer: Peer, task: Task) -> bool:
    """False for a whole copy or an origin reader of the object as it was before its latest change
    (engine._object_changed): such a peer is no parent for new children and no source to count on."""
    if peer.state is PeerState.SUCCEEDED or peer.reads_origin:
        return peer.object_version == task.object_version
    return True


def _start_over(task: Task) -> None:
    """Forget what the task's last download learned (layout, digests, who read the origin, the spec)."""
    task.state = TaskState.PENDING
    task.download = None
    task.layout = None
    task.publisher_id = None
    task.published_digests.clear()
    for peer in task.peers.values():  # versions count from 0 again; the old object's copies stay stale
        peer.object_version = 0 if peer.object_version == task.object_version else -1
    task.object_version = 0  # the reference is gone: what is read next is the object
    task.seed_trigger_pending = False
    task.source_requested_at = None


def seed_download(download: DownloadSpec) -> DownloadSpec:
    """The spec a seed peer is asked to fetch: same task, straight from the origin, under the seed's own
    time limit (not the first requester's `--timeout`, which would bound the whole swarm's source)."""
    return dataclasses.replace(
        download, need_back_to_source=True, disable_back_to_source=False, timeout_s=0.0
    )
