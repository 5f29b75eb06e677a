"""Hypothesis properties of the engine over random event sequences.

Invariants: a child never gets itself or a peer of its own host; at most candidate_parent_limit
parents; never a parent it blocked, on a suspended host, or in a bad state; in `dag` topology the
parent graph has no cycle; concurrent origin readers per task stay within back_to_source_limit
(triggered seeds aside); the engine is deterministic (same events, same seed → same commands).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_testkit import host_info

from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.core.filters import BAD_PARENT_STATES
from dfly.scheduler.core.messages import (
    BackToSourceStarted,
    Command,
    DownloadSpec,
    Event,
    FinishedPiece,
    HostAnnounced,
    HostDisconnected,
    HostKeepAlive,
    HostLeft,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PeerRegistered,
    PiecesFinished,
    RescheduleRequested,
    SeedTriggerFailed,
    SendBackToSource,
    SendCandidateParents,
    SourceErrorInfo,
    TriggerSeedPeer,
)

HOSTS = 6  # host 0 and 1 are seeds
PEERS = 10
TASKS = 2

host_index = st.integers(0, HOSTS - 1)
peer_index = st.integers(0, PEERS - 1)
task_index = st.integers(0, TASKS - 1)

registers = st.tuples(st.just("register"), peer_index, host_index, task_index, st.booleans())
operations = st.one_of(
    registers,
    registers,
    st.tuples(st.just("seed_register"), task_index),
    st.tuples(st.just("start_origin"), peer_index),
    st.tuples(st.just("pieces"), peer_index, st.integers(0, 3)),
    st.tuples(st.just("announce"), host_index, st.integers(1, 2)),
    st.tuples(st.just("disconnect"), host_index),
    st.tuples(st.just("keepalive"), host_index, st.floats(0, 1e9), st.integers(0, 300)),
    st.tuples(st.just("leave_host"), host_index),
    st.tuples(st.just("register"), peer_index, host_index, task_index, st.booleans()),
    st.tuples(st.just("seed_register"), task_index),
    st.tuples(st.just("seed_fail"), task_index),
    st.tuples(st.just("start_origin"), peer_index),
    st.tuples(st.just("pieces"), peer_index, st.integers(0, 3)),
    st.tuples(st.just("finish"), peer_index),
    st.tuples(st.just("fail"), peer_index, st.booleans()),
    st.tuples(st.just("reschedule"), peer_index, peer_index, peer_index, st.booleans()),
    st.tuples(st.just("leave"), peer_index),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 0.6, 2.0, 3600.0])),
)


def host(index: int, boot: int = 1) -> Any:
    return host_info(f"h{index}", seed=index < 2, boot_id=f"boot-{boot}", upload_slots=4)


@dataclass
class Run:
    config: EngineConfig
    seed: int = 3
    now: float = 0.0
    told_origin: set[str] = field(default_factory=set)
    triggers: dict[str, TriggerSeedPeer] = field(default_factory=dict)
    seed_peers: int = 0
    log: list[Command] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = SchedulerEngine(self.config, random.Random(self.seed))

    def event_for(self, op: tuple[Any, ...]) -> Event | None:
        kind = op[0]
        if kind == "announce":
            return HostAnnounced(host(op[1], op[2]))
        if kind == "disconnect":
            return HostDisconnected(host(op[1]).host_id)
        if kind == "keepalive":
            current = self.engine.cluster.hosts.get(host(op[1]).host_id)
            boot = current.info.boot_id if current else "boot-1"
            return HostKeepAlive(host(op[1]).host_id, boot, op[2], op[3])
        if kind == "leave_host":
            return HostLeft(host(op[1]).host_id)
        if kind == "register":
            spec = DownloadSpec(url=f"http://origin/{op[3]}", disable_back_to_source=op[4])
            self.told_origin.discard(f"p{op[1]}")  # a new registration starts undecided
            return PeerRegistered(f"p{op[1]}", host(op[2]).host_id, f"t{op[3]}", spec)
        if kind == "seed_register":
            trigger = self.triggers.pop(f"t{op[1]}", None)
            if trigger is None:
                return None
            self.seed_peers += 1
            return PeerRegistered(
                f"s{self.seed_peers}", trigger.seed_host_id, trigger.task_id, trigger.download
            )
        if kind == "seed_fail":
            trigger = self.triggers.pop(f"t{op[1]}", None)
            return (
                None
                if trigger is None
                else SeedTriggerFailed(trigger.task_id, trigger.seed_host_id, "refused")
            )
        if kind == "start_origin":
            told = sorted(self.told_origin & set(self.engine.cluster.peers))
            return BackToSourceStarted(told[op[1] % len(told)], 4096, 1024) if told else None
        known = sorted(self.engine.cluster.peers)
        peer_id = known[op[1] % len(known)] if known and op[1] % 3 else f"p{op[1]}"
        if kind == "pieces":
            return PiecesFinished(peer_id, tuple(FinishedPiece(n, n + 7) for n in range(op[2])))
        if kind == "finish":
            return PeerFinished(peer_id, (7, 8, 9, 10))
        if kind == "fail":
            error = SourceErrorInfo(500, "boom") if op[2] else None
            return PeerFailed(peer_id, "failed", error, back_to_source=op[2])
        if kind == "reschedule":
            if op[4]:  # the child only wants more parents
                return RescheduleRequested(peer_id, more_parents=True)
            return RescheduleRequested(peer_id, (f"p{op[2]}",), (f"p{op[3]}",))
        if kind == "leave":
            return PeerLeft(peer_id)
        return None

    def step(self, op: tuple[Any, ...]) -> list[Command]:
        if op[0] == "advance":
            target = self.now + op[1]
            commands: list[Command] = []
            while (deadline := self.engine.next_deadline()) is not None and deadline <= target:
                self.now = max(self.now, deadline)
                commands.extend(self.engine.on_timer(self.now))
                self.check(commands)
            self.now = target
        else:
            event = self.event_for(op)
            commands = [] if event is None else self.engine.handle(event, self.now)
            self.check(commands)
        self.log.extend(commands)
        return commands

    def check(self, commands: list[Command]) -> None:
        cluster = self.engine.cluster
        for command in commands:
            if isinstance(command, SendBackToSource):
                self.told_origin.add(command.peer_id)
            if isinstance(command, TriggerSeedPeer):
                self.triggers[command.task_id] = command
            if not isinstance(command, SendCandidateParents):
                continue
            child = cluster.peers[command.peer_id]
            assert 0 < len(command.parents) <= self.config.candidate_parent_limit
            assert len(child.parent_ids) <= self.config.candidate_parent_limit
            assert len({p.peer_id for p in command.parents}) == len(command.parents)
            for offered in command.parents:
                parent = cluster.peers[offered.peer_id]
                assert parent.peer_id != child.peer_id
                assert parent.host_id != child.host_id
                assert parent.peer_id not in child.blocked
                assert parent.state not in BAD_PARENT_STATES
                assert not cluster.hosts[parent.host_id].is_suspended(self.now)
        for task in cluster.tasks.values():
            normal_readers = [p for p in task.peers.values() if p.reads_origin and not p.is_seed]
            assert len(normal_readers) <= self.config.back_to_source_limit
            if self.config.topology == "dag":
                assert_acyclic(task.peers)
            for peer in task.peers.values():
                assert all(parent_id in task.peers for parent_id in peer.parent_ids)


def assert_acyclic(peers: dict[str, Any]) -> None:
    for peer in peers.values():
        for parent_id in peer.parent_ids:
            parent = peers[parent_id]  # edges never point at a forgotten peer
            assert peer.peer_id in parent.children
            assert parent.depth < peer.depth  # the depth invariant
            assert not _reaches(peers, peer, parent)  # and, checked the slow way, no cycle


def _reaches(peers: dict[str, Any], start: Any, target: Any) -> bool:
    """Is there a path start → … → target along edges parent → child?"""
    children: dict[str, list[str]] = {}
    for peer in peers.values():
        for parent_id in peer.parent_ids:
            children.setdefault(parent_id, []).append(peer.peer_id)
    stack, seen = [start.peer_id], set()
    while stack:
        current = stack.pop()
        if current == target.peer_id:
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(children.get(current, []))
    return False


def prelude() -> list[tuple[Any, ...]]:
    return [("announce", index, 1) for index in range(HOSTS)]


configs = st.builds(
    EngineConfig,
    candidate_parent_limit=st.integers(1, 4),
    filter_parent_limit=st.integers(1, 15),
    back_to_source_limit=st.integers(0, 2),
    topology=st.sampled_from(["mesh", "dag"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, ops=st.lists(operations, min_size=10, max_size=80))
def test_invariants_hold_for_any_event_sequence(config: EngineConfig, ops: list[tuple[Any, ...]]) -> None:
    run = Run(config)
    for op in prelude() + ops:
        run.step(op)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(operations, min_size=10, max_size=50), seed=st.integers(0, 2**32))
def test_same_events_and_seed_give_the_same_commands(ops: list[tuple[Any, ...]], seed: int) -> None:
    first, second = Run(EngineConfig(), seed=seed), Run(EngineConfig(), seed=seed)
    for op in prelude() + ops:
        first.step(op)
        second.step(op)
    assert first.log == second.log


def test_dag_topology_never_builds_a_cycle_in_a_busy_swarm() -> None:
    run = Run(EngineConfig(topology="dag", back_to_source_limit=1))
    rng = random.Random(11)
    for op in prelude():
        run.step(op)
    for _ in range(2000):
        op = rng.choice(
            [
                ("register", rng.randrange(PEERS), rng.randrange(HOSTS), 0, False),
                ("seed_register", 0),
                ("start_origin", rng.randrange(PEERS)),
                ("pieces", rng.randrange(PEERS), 2),
                ("reschedule", rng.randrange(PEERS), rng.randrange(PEERS), rng.randrange(PEERS), False),
                ("reschedule", rng.randrange(PEERS), 0, 0, True),
                ("advance", 0.5),
            ]
        )
        run.step(op)
