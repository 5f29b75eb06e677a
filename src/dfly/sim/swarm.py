"""One simulated run: N hosts and one seed host pull K layers at once through the real scheduler core.

Setup (all before the clock starts, as the testbed readies every daemon first): every host announces
itself (HostInfo with its IDC and location labels), keepalives follow every `keepalive_interval_s` at a
random phase. At t=0 (plus an optional per-host start spread) every host registers one peer per layer;
the engine's seed trigger makes the seed host register a back-to-source peer that reads the origin.
Churn: a fraction of the (non-seed) hosts leave at a uniform random time within [0.1, 0.9] × bound:
LeaveHost reaches the scheduler, and every connection of theirs closes (children drop them as parents).
The run ends when every peer of the hosts still present has ended, or at `max_sim_s`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from dfly.common.ids import task_id
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.core.messages import (
    DownloadSpec,
    HostAnnounced,
    HostInfo,
    HostKeepAlive,
    HostLeft,
    SeedTriggerFailed,
    TriggerSeedPeer,
)
from dfly.sim.flows import Link
from dfly.sim.model import RATE_EWMA_KEEP, RATE_SAMPLE_S, DaemonSettings, SimHost, TaskSpec, World
from dfly.sim.peer import SimPeer
from dfly.sim.scheduler import SimScheduler

TCP_PAYLOAD_FACTOR = 1448 / 1514  # payload bytes per wire byte of a full-size TCP segment on Ethernet


@dataclass(frozen=True)
class SwarmConfig:
    """A scenario; rates are payload bytes per second (apply TCP_PAYLOAD_FACTOR to wire rates first)."""

    hosts: int
    file_bytes: int
    host_up: float
    host_down: float
    seed_up: float
    seed_down: float
    origin: float
    layers: int = 1
    piece_length: int = 0  # user-fixed piece length; 0 = the daemon's rule
    engine: EngineConfig = field(default_factory=EngineConfig)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    churn: float = 0.0
    latency_s: float = 0.0001
    scheduler_latency_s: float = 0.0001
    idcs: int = 1
    idc_latency_s: float = 0.0
    start_spread_s: float = 0.0
    fairness: str = "equal"  # link sharing, see dfly.sim.flows
    seed: int = 0
    max_sim_s: float = 0.0  # 0 = 50 x bound + 120 s

    def bound_s(self) -> float:
        """Per-host bound: max(F/R_down, F/R_seed, F/R_origin, N·F/(R_seed + N·R_up))."""
        f, n = float(self.file_bytes), self.hosts
        return max(
            f / self.host_down,
            f / self.seed_up,
            f / min(self.origin, self.seed_down),
            n * f / (self.seed_up + n * self.host_up),
        )


@dataclass
class SwarmResult:
    config: SwarmConfig
    host_times: list[float]  # completed hosts still present, seconds from their own start
    left: int
    failed: int  # hosts still present that did not complete
    origin_bytes: float
    seed_upload_bytes: float
    sim_s: float
    wall_s: float
    events: int
    scheduler_cpu_s: float
    scheduler_events: int
    scheduler_timer_calls: int
    engine_errors: int
    first_error: str
    piece_bytes: dict[str, float]
    failures: list[str]
    piece_length: int  # as fixed by the first back-to-source peer (0 if none started)


class Swarm:
    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.world = World(
            rng=random.Random(self.rng.getrandbits(64)),
            settings=config.daemon,
            fairness=config.fairness,
            latency_s=config.latency_s,
            idc_latency_s=config.idc_latency_s,
            origin=Link("origin", config.origin),
        )
        engine = SchedulerEngine(config.engine, random.Random(self.rng.getrandbits(64)))
        self.scheduler = SimScheduler(self.world, engine, config.scheduler_latency_s)
        self.world.scheduler = self.scheduler
        self.world.on_peer_end = self._peer_ended
        self.world.on_seed_trigger = self._seed_triggered
        self.tasks = self._tasks()
        self.task_index = {task.task_id: i for i, task in enumerate(self.tasks)}
        self.hosts: list[SimHost] = []
        self.seed_host: SimHost | None = None
        self.start_at: dict[str, float] = {}
        self.pending = 0
        self.left = 0
        self.seed_attempts: dict[str, int] = {}

    def _tasks(self) -> list[TaskSpec]:
        c = self.config
        base, extra = divmod(c.file_bytes, c.layers)
        tasks = []
        for i in range(c.layers):
            url = f"http://origin.sim/layers/{i}"
            size = base + (extra if i == c.layers - 1 else 0)
            tid = task_id(url, piece_length=c.piece_length or None)
            tasks.append(TaskSpec(tid, url, size))
        return tasks

    # --- setup ---------------------------------------------------------------------------------------

    def _host(self, index: int, seed: bool) -> SimHost:
        c = self.config
        name = "seed" if seed else f"h{index}"
        ip = "10.255.0.1" if seed else f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
        up, down = (c.seed_up, c.seed_down) if seed else (c.host_up, c.host_down)
        idc = f"idc{index % c.idcs}" if c.idcs > 1 and not seed else ("idc0" if c.idcs > 1 else "")
        location = f"region{(index % c.idcs) // 2}|{idc}" if idc else ""
        host = SimHost(
            f"{ip}-{name}", Link(f"{name}.up", up), Link(f"{name}.down", down), seed, idc, location
        )
        host.slots_free = c.daemon.upload_slots
        limit = int(up) if c.daemon.announce_upload_limit else 0
        info = HostInfo(
            host_id=host.host_id,
            hostname=name,
            ip=ip,
            piece_port=4005,
            control_port=4000,
            seed=seed,
            boot_id="boot",
            idc=idc,
            location=location,
            upload_limit_bytes_per_s=limit,
            upload_slots=c.daemon.upload_slots,
        )
        self.world.hosts[host.host_id] = host
        self.scheduler.handle_now(HostAnnounced(info))
        return host

    def _setup(self) -> None:
        c = self.config
        clock = self.world.clock
        self.seed_host = self._host(0, seed=True)
        self.hosts = [self._host(i, seed=False) for i in range(c.hosts)]
        interval = c.daemon.keepalive_interval_s
        for host in [self.seed_host, *self.hosts]:
            clock.at(self.rng.uniform(0, interval), self._keepalive, host)
        for host in self.hosts:
            start = self.rng.uniform(0, c.start_spread_s) if c.start_spread_s > 0 else 0.0
            self.start_at[host.host_id] = start
            for index, task in enumerate(self.tasks):
                peer_id = f"{host.host_id}-t{index}"
                spec = DownloadSpec(url=task.url, piece_length=c.piece_length)
                peer = SimPeer(self.world, host, task, peer_id, spec)
                host.peers[task.task_id] = peer
                self.world.peers[peer_id] = peer
                self.pending += 1
                clock.at(start, _start_peer, peer)
        leaving = round(c.churn * c.hosts)
        bound = c.bound_s()
        for host in self.rng.sample(self.hosts, leaving):
            clock.at(self.rng.uniform(0.1 * bound, 0.9 * bound), self._leave, host)

    # --- events --------------------------------------------------------------------------------------

    def _keepalive(self, host: SimHost) -> None:
        if not host.alive:
            return
        interval = self.config.daemon.keepalive_interval_s
        average = (host.uploaded_bytes - host.uploaded_at_last_sample) / interval
        keep = RATE_EWMA_KEEP ** (interval / RATE_SAMPLE_S)  # the per-second EWMA over the interval
        host.rate_ewma = keep * host.rate_ewma + (1 - keep) * average
        host.uploaded_at_last_sample = host.uploaded_bytes
        self.scheduler.send(HostKeepAlive(host.host_id, "boot", host.rate_ewma, host.uploads_in_flight))
        self.world.clock.after(interval, self._keepalive, host)

    def _leave(self, host: SimHost) -> None:
        if not host.alive:
            return
        host.alive = False
        self.left += 1
        self.scheduler.send(HostLeft(host.host_id))
        for peer in list(host.peers.values()):
            peer.kill()

    def _seed_triggered(self, command: TriggerSeedPeer) -> None:
        host = self.world.hosts.get(command.seed_host_id)
        if host is None or not host.alive:
            description = f"seed {command.seed_host_id} unreachable"
            self.scheduler.send(SeedTriggerFailed(command.task_id, command.seed_host_id, description))
            return
        existing = host.peers.get(command.task_id)
        if existing is not None and not existing.ended:
            return  # one live task per task id: the trigger attaches to it
        index = self.task_index[command.task_id]
        attempt = self.seed_attempts[command.task_id] = self.seed_attempts.get(command.task_id, -1) + 1
        peer_id = f"{host.host_id}-t{index}-seed{attempt}"
        peer = SimPeer(self.world, host, self.tasks[index], peer_id, command.download)
        host.peers[command.task_id] = peer
        self.world.peers[peer_id] = peer
        peer.start()

    def _peer_ended(self, peer: SimPeer) -> None:
        if peer.host.seed:
            return
        self.pending -= 1
        if self.pending == 0:
            self.world.clock.stop()

    # --- run -----------------------------------------------------------------------------------------

    def run(self) -> SwarmResult:
        started = time.perf_counter()
        c = self.config
        self._setup()
        limit = c.max_sim_s or 50 * c.bound_s() + 120
        self.world.clock.run(until=limit)
        wall = time.perf_counter() - started
        times: list[float] = []
        failures: list[str] = []
        failed = 0
        for host in self.hosts:
            if not host.alive:
                continue
            peers = list(host.peers.values())
            if all(p.succeeded for p in peers):
                times.append(max(p.finished_at or 0.0 for p in peers) - self.start_at[host.host_id])
            else:
                failed += 1
                errors = [p.error or "did not finish" for p in peers if not p.succeeded]
                if len(failures) < 5:
                    failures.append(f"{host.host_id}: {errors[0]}")
        assert self.seed_host is not None
        return SwarmResult(
            config=c,
            host_times=times,
            left=self.left,
            failed=failed,
            origin_bytes=self.world.origin_bytes,
            seed_upload_bytes=self.seed_host.uploaded_bytes,
            sim_s=self.world.clock.now,
            wall_s=wall,
            events=self.world.clock.events,
            scheduler_cpu_s=self.scheduler.cpu_s,
            scheduler_events=self.scheduler.events + self.scheduler.timer_calls,
            scheduler_timer_calls=self.scheduler.timer_calls,
            engine_errors=self.scheduler.errors,
            first_error=self.scheduler.first_error,
            piece_bytes=dict(self.world.piece_bytes),
            failures=failures,
            piece_length=max((p.piece_length for p in self.world.peers.values()), default=0),
        )


def _start_peer(peer: SimPeer) -> None:
    peer.start()


def run_swarm(config: SwarmConfig) -> SwarmResult:
    return Swarm(config).run()
