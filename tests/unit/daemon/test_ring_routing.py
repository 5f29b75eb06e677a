"""Task → scheduler routing: rendezvous hashing over the healthy schedulers (daemon/scheduler_ring.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import cast

import pytest

from dfly.daemon.scheduler_client import SchedulerClient
from dfly.daemon.scheduler_ring import SchedulerRing, owner

ADDRS = [f"10.0.0.{i}:8002" for i in range(1, 5)]
TASKS = [f"{i:064x}" for i in range(400)]


class FakeClient:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.connected = asyncio.Event()
        self.connected.set()
        self.on_connected = None
        self.on_disconnected = None


def ring() -> tuple[SchedulerRing, list[FakeClient]]:
    clients = [FakeClient(addr) for addr in ADDRS]
    return SchedulerRing(cast(list[SchedulerClient], clients)), clients


def test_every_peer_of_a_task_picks_the_same_scheduler_and_tasks_spread() -> None:
    async def scenario() -> None:
        first, _ = ring()
        second, _ = ring()
        picks = [first.pick(t).addr for t in TASKS]
        assert picks == [second.pick(t).addr for t in TASKS]
        assert picks == [owner(t, ADDRS) for t in TASKS]
        assert all(picks.count(addr) > len(TASKS) // 8 for addr in ADDRS)  # no scheduler left idle

    asyncio.run(scenario())


def test_when_a_scheduler_goes_only_its_tasks_move() -> None:
    async def scenario() -> None:
        routing, clients = ring()
        before = {t: routing.pick(t).addr for t in TASKS}
        clients[1].connected.clear()
        after = {t: routing.pick(t).addr for t in TASKS}
        moved = {t for t in TASKS if before[t] != after[t]}
        assert moved == {t for t in TASKS if before[t] == ADDRS[1]}
        assert ADDRS[1] not in after.values()
        for client in clients:
            client.connected.clear()
        assert {t: routing.pick(t).addr for t in TASKS} == before  # none healthy: the same rule over all

    asyncio.run(scenario())


def test_the_ring_says_how_long_no_scheduler_has_been_connected() -> None:
    async def scenario() -> None:
        now = [100.0]
        clients = [FakeClient(addr) for addr in ADDRS[:2]]
        routing = SchedulerRing(cast(list[SchedulerClient], clients), clock=lambda: now[0])
        assert routing.unhealthy_for_s() == 0.0
        clients[0].connected.clear()
        routing._disconnected()  # the hook each client calls when its keepalive breaks
        assert routing.unhealthy_for_s() == 0.0  # the other one is still up
        clients[1].connected.clear()
        routing._disconnected()
        now[0] += 4.0
        assert routing.unhealthy_for_s() == 4.0  # a download now registers without waiting
        routing._disconnected()  # a later break does not move the start of the outage
        assert routing.unhealthy_for_s() == 4.0
        clients[0].connected.set()
        routing._connected()
        assert routing.unhealthy_for_s() == 0.0

    asyncio.run(scenario())


def test_an_announce_one_scheduler_refuses_leaves_no_unretrieved_error() -> None:
    """Both attempts end together, one refused: the announce succeeds, and the refusal is retrieved
    (asyncio would log "Task exception was never retrieved" with a traceback when it is collected)."""

    class AnnouncingClient(FakeClient):
        def __init__(self, addr: str, refuse: bool) -> None:
            super().__init__(addr)
            self.refuse = refuse

        async def announce(self) -> None:
            if self.refuse:
                raise OSError("scheduler refused")

    async def scenario() -> list[dict[str, object]]:
        reports: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reports.append(context))
        for refused_first in [True, False] * 10:  # the done set's order is not the clients'
            clients = [
                AnnouncingClient(ADDRS[0], refused_first),
                AnnouncingClient(ADDRS[1], not refused_first),
            ]
            await SchedulerRing(cast(list[SchedulerClient], clients)).announce_any()
        gc.collect()
        await asyncio.sleep(0)
        return reports

    assert asyncio.run(scenario()) == []


def test_a_failed_reannounce_is_logged_and_close_waits_for_those_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When a scheduler goes, the others are told again in the background: an unexpected failure is
    logged when it happens, and close() ends those still running before the channels close."""

    class ReannouncingClient(FakeClient):
        def __init__(self, addr: str, fail: bool) -> None:
            super().__init__(addr)
            self.fail = fail
            self.release = asyncio.Event()
            self.closed = False

        async def announce(self, only: object = None) -> None:
            if self.fail:
                raise ValueError("bad announce")
            await self.release.wait()

        async def close(self) -> None:
            self.closed = True

    async def scenario() -> tuple[list[dict[str, object]], bool]:
        reports: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reports.append(context))
        failing = [ReannouncingClient(ADDRS[0], fail=True)]
        routing = SchedulerRing(cast(list[SchedulerClient], failing))
        failing[0].on_disconnected()  # type: ignore[misc]  # the ring's callback, as the client calls it
        await asyncio.wait(list(routing._pending), timeout=5)
        await asyncio.sleep(0)  # its done callbacks run
        hanging = [ReannouncingClient(ADDRS[1], fail=False)]
        closing = SchedulerRing(cast(list[SchedulerClient], hanging))
        hanging[0].on_disconnected()  # type: ignore[misc]
        await asyncio.sleep(0)
        in_flight = list(closing._pending)
        await asyncio.wait_for(closing.close(), 5)
        gc.collect()
        return reports, bool(in_flight) and all(t.done() for t in in_flight) and hanging[0].closed

    with caplog.at_level(logging.WARNING, logger="dfly.daemon.scheduler_ring"):
        reports, closed_after = asyncio.run(scenario())
    assert reports == []
    assert closed_after
    assert any("announcing again to the other schedulers failed" in r.getMessage() for r in caplog.records)
