"""The scheduler's channels to seed peers follow the seeds it knows: one per connected seed, reused by
every trigger, closed when the seed leaves, disconnects or moves, never under a trigger in flight.

A SchedulerService on a grpc.aio server on 127.0.0.1, driven through a real stub; fake DfdaemonControl
servers play the seeds' control ports, and a recording channel factory builds real channels.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import pytest
from grpc import aio
from schedulerkit import control_server, host

from dfly.api import daemon_pb2, daemon_pb2_grpc, scheduler_pb2_grpc
from dfly.api import scheduler_pb2 as pb
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.metrics import SchedulerMetrics
from dfly.scheduler.service import SchedulerService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

STEP_S = 5.0  # bound on every single await
SEED_ID = "127.0.0.1-seed"


class SeedControl(daemon_pb2_grpc.DfdaemonControlServicer):
    """Accepts every trigger; with `hold` set, answers only once `release` is set."""

    def __init__(self, hold: bool = False) -> None:
        self.requests: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()
        self.hold = hold
        self.cancelled = False

    async def DownloadTask(self, request: daemon_pb2.DownloadTaskRequest, context: Any) -> Any:
        self.requests.put_nowait(request.task_id)
        try:
            if self.hold:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return daemon_pb2.DownloadTaskResponse(task_id=request.task_id, accepted=True)


class _Recorded:
    """A real channel that reports its close."""

    def __init__(self, channel: aio.Channel, address: str, closed: asyncio.Queue[str]) -> None:
        self._channel = channel
        self._address = address
        self._closed = closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        self._closed.put_nowait(self._address)


class RecordingFactory:
    def __init__(self) -> None:
        self.created: list[str] = []
        self.closed: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, address: str) -> aio.Channel:
        self.created.append(address)
        return cast(aio.Channel, _Recorded(aio.insecure_channel(address), address, self.closed))

    async def next_closed(self) -> str:
        return await asyncio.wait_for(self.closed.get(), STEP_S)


@dataclass
class Running:
    stub: Any  # scheduler_pb2_grpc.SchedulerStub: its stubs type the sync API, not grpc.aio's
    channels: RecordingFactory
    metrics: SchedulerMetrics


@asynccontextmanager
async def scheduler() -> AsyncIterator[Running]:
    loop = asyncio.get_running_loop()
    engine = SchedulerEngine(EngineConfig(startup_grace_s=0), random.Random(1), started_at=loop.time())
    channels = RecordingFactory()
    metrics = SchedulerMetrics()
    service = SchedulerService(engine, metrics, channel_factory=channels)
    await service.start()
    server = aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(scheduler_pb2_grpc.SchedulerStub(channel), channels, metrics)
    finally:
        await service.stop()
        await server.stop(None)


async def announce_seed(stub: Any, control_port: int) -> None:
    await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("seed", seed=True, control_port=control_port)))


async def download(stub: Any, task_id: str) -> Any:
    """A child's AnnouncePeer stream, registered for the task (its first register triggers the seed)."""
    call = stub.AnnouncePeer()
    download = pb.Download(url=f"http://origin.test/{task_id}")
    register = pb.RegisterPeer(download=download)
    request = pb.AnnouncePeerRequest(
        host_id="127.0.0.1-child", task_id=task_id, peer_id=f"child-{task_id}", register=register
    )
    await call.write(request)
    return call


async def triggered(control: SeedControl) -> str:
    return await asyncio.wait_for(control.requests.get(), STEP_S)


def address(port: int) -> str:
    return f"127.0.0.1:{port}"


def test_a_seed_channel_is_reused_and_closed_when_the_seed_moves_or_leaves() -> None:
    async def scenario() -> None:
        old, new = SeedControl(), SeedControl()
        async with AsyncExitStack() as stack:
            old_port = await stack.enter_async_context(control_server(old))
            new_port = await stack.enter_async_context(control_server(new))
            running = await stack.enter_async_context(scheduler())
            stub, channels = running.stub, running.channels
            await announce_seed(stub, old_port)
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))
            calls = [await download(stub, "task-1")]
            assert await triggered(old) == "task-1"
            calls.append(await download(stub, "task-2"))
            assert await triggered(old) == "task-2"
            assert channels.created == [address(old_port)]  # one channel, reused

            # The seed's pod restarted on a new address: the old one is closed, not kept for good.
            await announce_seed(stub, new_port)
            assert await channels.next_closed() == address(old_port)
            calls.append(await download(stub, "task-3"))
            assert await triggered(new) == "task-3"
            assert channels.created == [address(old_port), address(new_port)]

            await stub.LeaveHost(pb.LeaveHostRequest(host_id=SEED_ID))
            assert await channels.next_closed() == address(new_port)
            assert channels.closed.empty()
            for call in calls:
                call.cancel()

    asyncio.run(scenario())


def test_a_disconnected_seed_loses_its_channel_and_gets_a_new_one_when_back() -> None:
    async def scenario() -> None:
        control = SeedControl()
        async with AsyncExitStack() as stack:
            port = await stack.enter_async_context(control_server(control))
            running = await stack.enter_async_context(scheduler())
            stub, channels = running.stub, running.channels
            await announce_seed(stub, port)
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))
            keepalive = stub.HostKeepAlive()
            await keepalive.write(pb.HostKeepAliveRequest(host_id=SEED_ID, boot_id="boot-1"))
            calls = [await download(stub, "task-1")]
            assert await triggered(control) == "task-1"

            await keepalive.done_writing()  # the keepalive stream ends: the seed is disconnected
            await asyncio.wait_for(keepalive, STEP_S)
            assert await channels.next_closed() == address(port)

            await announce_seed(stub, port)  # back (a daemon announces again after a broken keepalive)
            calls.append(await download(stub, "task-2"))
            assert await triggered(control) == "task-2"
            assert channels.created == [address(port), address(port)]
            for call in calls:
                call.cancel()

    asyncio.run(scenario())


def test_a_trigger_in_flight_keeps_its_channel_until_it_is_answered() -> None:
    async def scenario() -> None:
        held, new = SeedControl(hold=True), SeedControl()
        async with AsyncExitStack() as stack:
            held_port = await stack.enter_async_context(control_server(held))
            new_port = await stack.enter_async_context(control_server(new))
            running = await stack.enter_async_context(scheduler())
            stub, channels = running.stub, running.channels
            await announce_seed(stub, held_port)
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))
            call = await download(stub, "task-1")
            assert await triggered(held) == "task-1"  # in flight: the seed has not answered yet

            await announce_seed(stub, new_port)  # the prune ran before this call returned
            assert channels.closed.empty()
            held.release.set()
            assert await channels.next_closed() == address(held_port)  # closed once answered
            assert not held.cancelled
            failed = running.metrics.registry.get_sample_value(
                "dfly_scheduler_seed_triggers_total", {"result": "failed"}
            )
            assert failed == 0.0  # the seed's "accepted" reached the engine, no failure in its place
            call.cancel()

    asyncio.run(scenario())
