"""The real SchedulerEngine behind a network delay, driven as the gRPC service drives it.

Events reach the engine `latency_s` after a peer sends them; its commands reach their peer (or, for a
seed trigger, the seed's daemon) `latency_s` later. One timer follows `engine.next_deadline()` after
every call, like the service's `loop.call_at`. The engine's own CPU time (thread CPU clock around
`handle`, `on_timer` and `next_deadline`) is measured; it never feeds back into the virtual clock, so
the model assumes the scheduler keeps up. An exception from the engine is counted and the event
dropped, as the service logs it and goes on.
"""

from __future__ import annotations

import time

from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.core.messages import Command, Event, TriggerSeedPeer
from dfly.sim.model import World


class SimScheduler:
    def __init__(self, world: World, engine: SchedulerEngine, latency_s: float) -> None:
        self.world = world
        self.engine = engine
        self.latency_s = latency_s
        self.cpu_s = 0.0
        self.events = 0
        self.timer_calls = 0
        self.commands = 0
        self.errors = 0
        self.first_error = ""
        self._armed: float | None = None

    def send(self, event: Event) -> None:
        self.world.clock.after(self.latency_s, self._handle, event)

    def handle_now(self, event: Event) -> None:
        """Hand an event to the engine at the current virtual time (setup before the clock runs)."""
        self._handle(event)

    def _handle(self, event: Event) -> None:
        clock = time.thread_time
        started = clock()
        try:
            commands = self.engine.handle(event, self.world.clock.now)
        except Exception as exc:  # the service logs and goes on; a run reports how many
            self._error(type(event).__name__, exc)
            commands = []
        self.cpu_s += clock() - started
        self.events += 1
        self._carry_out(commands)

    def _on_timer(self, at: float) -> None:
        if at != self._armed:
            return
        self._armed = None
        clock = time.thread_time
        started = clock()
        try:
            commands = self.engine.on_timer(max(self.world.clock.now, at))
        except Exception as exc:
            self._error("timer", exc)
            commands = []
        self.cpu_s += clock() - started
        self.timer_calls += 1
        self._carry_out(commands)

    def _error(self, where: str, exc: Exception) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"engine failed on {where}: {type(exc).__name__}: {exc}"

    def _carry_out(self, commands: list[Command]) -> None:
        clock = self.world.clock
        for command in commands:
            self.commands += 1
            if isinstance(command, TriggerSeedPeer):
                clock.after(self.latency_s, self.world.trigger_seed, command)
                continue
            peer = self.world.peers.get(command.peer_id)
            if peer is not None:
                clock.after(self.latency_s, peer.on_command, command)
        started = time.thread_time()
        deadline = self.engine.next_deadline()
        self.cpu_s += time.thread_time() - started
        if deadline != self._armed:
            self._armed = deadline
            if deadline is not None:
                clock.at(deadline, self._on_timer, deadline)
