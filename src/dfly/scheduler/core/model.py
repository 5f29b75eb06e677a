"""The scheduler's state: hosts, tasks and peers with their state machines (no behaviour beyond that).

Peer states: PENDING → RECEIVED → RUNNING → (BACK_TO_SOURCE) → SUCCEEDED | FAILED | LEAVE; a peer told to
read the origin may go RECEIVED → BACK_TO_SOURCE directly. Task states: PENDING, RUNNING, SUCCEEDED,
FAILED. Transitions are data (`PEER_TRANSITIONS`); `Peer.move_to` refuses any other, so a bug in the
engine shows up as an error instead of a silently odd swarm.

Each task keeps its peers that may serve as parents in an `IndexedSet`, so sampling candidates costs
O(sample size), never O(peers of the task).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from dfly.common.errors import DflyError
from dfly.scheduler.core.costs import PieceCosts
from dfly.scheduler.core.messages import DownloadSpec, HostInfo, TaskLayout


class InvalidTransition(DflyError):
    """The engine tried a state change the state machine does not allow (a bug)."""


class PeerState(enum.Enum):
    PENDING = "PENDING"
    RECEIVED = "RECEIVED"
    RUNNING = "RUNNING"
    BACK_TO_SOURCE = "BACK_TO_SOURCE"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    LEAVE = "LEAVE"


class TaskState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


_ENDED = frozenset({PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE})

PEER_TRANSITIONS: dict[PeerState, frozenset[PeerState]] = {
    PeerState.PENDING: frozenset(
        {PeerState.RECEIVED, PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE}
    ),
    PeerState.RECEIVED: frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE}) | _ENDED,
    PeerState.RUNNING: frozenset({PeerState.BACK_TO_SOURCE}) | _ENDED,
    PeerState.BACK_TO_SOURCE: _ENDED,
    PeerState.SUCCEEDED: frozenset({PeerState.LEAVE}),
    PeerState.FAILED: frozenset({PeerState.LEAVE}),
    PeerState.LEAVE: frozenset(),
}

ACTIVE_PEER_STATES = frozenset({PeerState.RECEIVED, PeerState.RUNNING, PeerState.BACK_TO_SOURCE})


class IndexedSet:
    """A set of ids with O(1) add/remove and O(k) uniform sampling of k members."""

    __slots__ = ("_index", "_items")

    def __init__(self) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: str) -> None:
        position = self._index.pop(item, None)
        if position is None:
            return
        last = self._items.pop()
        if position < len(self._items):
            self._items[position] = last
            self._index[last] = position

    def sample(self, rng: random.Random, k: int) -> list[str]:
        count = min(k, len(self._items))
        return [self._items[i] for i in rng.sample(range(len(self._items)), count)]

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))


@dataclass(slots=True, eq=False)
class Host:
    info: HostInfo
    upload_rate_bytes_per_s: float = 0.0  # observed (EWMA), from the keepalive
    upload_slots_in_use: int = 0  # from the keepalive
    child_edges: int = 0  # children the scheduler currently points at this host's peers
    disconnected: bool = False  # keepalive stream dropped or silent; lifted by a keepalive or an announce
    disconnected_at: float | None = None  # since when (forgotten after host_ttl_s)
    last_keepalive_at: float | None = None  # None until its first keepalive: silence is judged after that
    unreachable_until: float = -math.inf  # reported unreachable by enough children
    unreachable_reporters: set[str] = field(default_factory=set)
    corrupt_reporters: set[str] = field(default_factory=set)  # hosts that got a bad piece from it
    corrupt_until: float = -math.inf  # suspended for serving corrupt pieces; an announce does not lift it
    peer_ids: set[str] = field(default_factory=set)
    peers_by_task: dict[str, set[str]] = field(default_factory=dict)  # the same peers, by their task

    @property
    def host_id(self) -> str:
        return self.info.host_id

    def is_suspended(self, now: float) -> bool:
        return self.disconnected or now < self.unreachable_until or now < self.corrupt_until


@dataclass(slots=True, eq=False)
class Peer:
    peer_id: str
    task_id: str
    host_id: str
    download: DownloadSpec | None = None  # None for peers registered from a host's finished tasks
    state: PeerState = PeerState.PENDING
    is_seed: bool = False  # registered on a seed trigger (need_back_to_source)
    finished_piece_count: int = 0
    blocked: set[str] = field(default_factory=set)  # parents this child reported as failing it
    parent_ids: tuple[str, ...] = ()  # the parents last handed out (edges parent → self)
    children: set[str] = field(default_factory=set)  # edges self → children
    depth: int = 0  # dag topology: every edge goes from a smaller depth to a larger one
    waiting: bool = False  # needs parents (or a back-to-source decision)
    attempts: int = 0  # failed scheduling attempts in the current round
    retry_at: float | None = None
    reads_origin: bool = False  # told to read the origin, not yet finished, failed or gone
    object_version: int = 0  # the task's object_version its origin read began at, or it was accepted at
    finish_digests: tuple[int, ...] | None = None  # finished, verdict deferred
    # a whole copy announced after its task's object changed: a parent once the publication agrees
    announced_digests: tuple[int, ...] | None = None
    served_costs: PieceCosts | None = None  # costs of pieces it served, as its children report them

    def move_to(self, state: PeerState) -> None:
        if state is self.state:
            return
        if state not in PEER_TRANSITIONS[self.state]:
            raise InvalidTransition(f"peer {self.peer_id}: {self.state.value} → {state.value} is not allowed")
        self.state = state

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_PEER_STATES


@dataclass(slots=True, eq=False)
class Task:
    task_id: str
    download: DownloadSpec | None = None  # the first register's spec (what a seed is asked to fetch)
    state: TaskState = TaskState.PENDING
    layout: TaskLayout | None = None
    peers: dict[str, Peer] = field(default_factory=dict)
    parent_pool: IndexedSet = field(default_factory=IndexedSet)  # peers that may serve pieces
    hungry: IndexedSet = field(default_factory=IndexedSet)  # downloading with fewer parents than allowed
    waiting: dict[str, None] = field(default_factory=dict)  # ordered set of peers needing parents
    origin_readers: set[str] = field(default_factory=set)  # seeds included
    seed_readers: set[str] = field(default_factory=set)  # the subset that are triggered seeds
    publisher_id: str | None = None  # the back-to-source peer whose digests are the reference
    published_digests: dict[int, int] = field(default_factory=dict)
    object_version: int = 0  # one more each time an origin reader finds the object changed
    pending_verdicts: set[str] = field(default_factory=set)
    announced_pending: set[str] = field(default_factory=set)  # peers with announced_digests
    seed_trigger_pending: bool = False  # DownloadTask sent, the seed has not registered yet
    seed_failed_at: float | None = None
    source_requested_at: float | None = None  # when a seed was triggered / an origin reader sent
    progress_at: float = -math.inf  # when a peer of the task last reported finished pieces

    @property
    def normal_origin_readers(self) -> int:
        return len(self.origin_readers) - len(self.seed_readers)

    def expected_piece_count(self) -> int | None:
        if self.layout is None or self.layout.piece_length <= 0 or self.layout.content_length < 0:
            return None
        return -(-self.layout.content_length // self.layout.piece_length)
