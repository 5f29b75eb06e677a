"""Helpers for the scheduler unit tests: a virtual clock around a SchedulerEngine and event builders."""

from __future__ import annotations

import random
from typing import Any, TypeVar

from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.core.messages import (
    BackToSourceStarted,
    Command,
    DownloadSpec,
    Event,
    FinishedPiece,
    FinishedTask,
    HostAnnounced,
    HostInfo,
    PeerFinished,
    PeerRegistered,
    PiecesFinished,
)

MiB = 1024 * 1024
C = TypeVar("C")


def host_info(name: str, *, seed: bool = False, boot_id: str = "boot-1", **fields: Any) -> HostInfo:
    index = sum(name.encode()) % 250 + 1
    fields.setdefault("piece_port", 4005)
    fields.setdefault("control_port", 4000)
    return HostInfo(
        host_id=f"10.0.0.{index}-{name}",
        hostname=name,
        ip=f"10.0.0.{index}",
        seed=seed,
        boot_id=boot_id,
        **fields,
    )


def of_type(commands: list[Command], kind: type[C]) -> list[C]:
    return [command for command in commands if isinstance(command, kind)]


def swarm_with_seed(harness: Harness) -> None:
    """A seed host and two normal hosts, announced."""
    harness.announce("seed", seed=True)
    harness.announce("a")
    harness.announce("b")


class Harness:
    """An engine on a virtual clock: `now` only moves when a test moves it."""

    def __init__(
        self, config: EngineConfig | None = None, seed: int = 7, started_at: float | None = None
    ) -> None:
        self.engine = SchedulerEngine(config or EngineConfig(), random.Random(seed), started_at=started_at)
        self.now = 0.0
        self.hosts: dict[str, HostInfo] = {}
        self.log: list[Command] = []

    def do(self, event: Event) -> list[Command]:
        commands = self.engine.handle(event, self.now)
        self.log.extend(commands)
        return commands

    def advance(self, seconds: float) -> list[Command]:
        """Move the clock, firing every timer that falls due on the way, in order."""
        target = self.now + seconds
        commands: list[Command] = []
        while (deadline := self.engine.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            commands.extend(self.engine.on_timer(self.now))
        self.now = target
        self.log.extend(commands)
        return commands

    def announce(self, name: str, *, finished: tuple[FinishedTask, ...] = (), **fields: Any) -> str:
        info = host_info(name, **fields)
        self.hosts[name] = info
        self.do(HostAnnounced(info, finished))
        return info.host_id

    def host_id(self, name: str) -> str:
        return self.hosts[name].host_id

    def register(self, peer_id: str, host: str, task_id: str = "task-1", **download: Any) -> list[Command]:
        spec = DownloadSpec(url=download.pop("url", "http://origin/file"), **download)
        return self.do(PeerRegistered(peer_id, self.host_id(host), task_id, spec))

    def start_origin(
        self, peer_id: str, content_length: int = 4 * MiB, piece_length: int = MiB
    ) -> list[Command]:
        return self.do(BackToSourceStarted(peer_id, content_length, piece_length))

    def pieces(self, peer_id: str, *numbers: int, parent: str = "", digest_base: int = 100) -> list[Command]:
        pieces = tuple(FinishedPiece(n, digest_base + n, parent) for n in numbers)
        return self.do(PiecesFinished(peer_id, pieces))


def finished_on_a(*hosts: str) -> Harness:
    """Hosts announced; peer-a on host a read task-1 (2 pieces of 1 KiB, digests 100 and 101) and finished."""
    harness = Harness()
    for name in hosts:
        harness.announce(name)
    harness.register("peer-a", "a")
    harness.start_origin("peer-a", content_length=2048, piece_length=1024)
    harness.pieces("peer-a", 0, 1)
    harness.do(PeerFinished("peer-a", (100, 101)))
    return harness
