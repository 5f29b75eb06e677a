"""SeedTriggers' channel bookkeeping, on fake channels: one per current seed, reused, retired when the
seed is gone or moved, closed only once no trigger is on it; and the engine's seed endpoint it follows."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from grpc import aio
from scheduler_testkit import Harness, host_info

from dfly.api import daemon_pb2
from dfly.scheduler.core.messages import (
    DownloadSpec,
    HostAnnounced,
    HostDisconnected,
    HostLeft,
    SeedTriggerFailed,
    TriggerSeedPeer,
)
from dfly.scheduler.seed_triggers import SeedTriggers

pytestmark = pytest.mark.timeout(10)

STEP_S = 2.0


def test_the_engine_names_a_seed_endpoint_only_while_it_is_a_connected_seed(harness: Harness) -> None:
    seed = harness.announce("seed", seed=True)
    endpoint = harness.engine.seed_control_endpoint
    assert endpoint(seed) == (harness.hosts["seed"].ip, 4000)
    assert endpoint(harness.announce("plain")) is None
    harness.do(HostAnnounced(host_info("seed", seed=True, control_port=4100)))  # moved
    assert endpoint(seed) == (harness.hosts["seed"].ip, 4100)
    harness.do(HostDisconnected(seed))
    assert endpoint(seed) is None
    harness.do(HostAnnounced(host_info("seed", seed=True)))
    assert endpoint(seed) is not None
    harness.do(HostAnnounced(host_info("seed", seed=False)))  # no longer a seed
    assert endpoint(seed) is None
    harness.do(HostLeft(seed))
    assert endpoint(seed) is None


class FakeChannel:
    """Answers each DownloadTask when the test resolves its future (`answers`, in call order)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed_event = asyncio.Event()
        self.answers: asyncio.Queue[asyncio.Future[daemon_pb2.DownloadTaskResponse]] = asyncio.Queue()

    def unary_unary(self, method: str, **_: Any) -> Any:
        async def call(request: daemon_pb2.DownloadTaskRequest, **options: Any) -> Any:
            answer = asyncio.get_running_loop().create_future()
            self.answers.put_nowait(answer)
            return await answer

        return call

    @property
    def closed(self) -> bool:
        return self.closed_event.is_set()

    async def close(self, grace: float | None = None) -> None:
        self.closed_event.set()

    async def wait_closed(self) -> None:
        await asyncio.wait_for(self.closed_event.wait(), STEP_S)

    async def answer(self, accepted: bool = True) -> None:
        future = await asyncio.wait_for(self.answers.get(), STEP_S)
        future.set_result(daemon_pb2.DownloadTaskResponse(accepted=accepted))


class Fixture:
    def __init__(self) -> None:
        self.seeds: dict[str, str] = {}  # host id → current control address (the engine's view)
        self.channels: list[FakeChannel] = []
        self.triggers = SeedTriggers(self._build, self.seeds.get, timeout_s=5.0)

    def _build(self, address: str) -> aio.Channel:
        channel = FakeChannel(address)
        self.channels.append(channel)
        return cast(aio.Channel, channel)

    def start(self, host_id: str, task_id: str) -> asyncio.Task[SeedTriggerFailed | None]:
        ip, port = self.seeds.get(host_id, "10.9.9.9:4000").split(":")
        command = TriggerSeedPeer(task_id, host_id, ip, int(port), DownloadSpec(url="http://origin/x"))
        return asyncio.get_running_loop().create_task(self.triggers.trigger(command))


async def settle() -> None:
    """Let the tasks already scheduled run, before checking that a channel was NOT closed."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_current_seed_keeps_one_channel_and_a_gone_one_is_closed_at_once() -> None:
    async def scenario() -> None:
        fx = Fixture()
        fx.seeds["seed"] = "10.0.0.1:4000"
        for task_id in ("t1", "t2"):
            trigger = fx.start("seed", task_id)
            await asyncio.sleep(0)
            await fx.channels[0].answer()
            assert await asyncio.wait_for(trigger, STEP_S) is None
        assert len(fx.channels) == 1
        assert fx.triggers.open_channels == 1
        fx.triggers.prune()
        assert not fx.channels[0].closed  # still a current seed
        del fx.seeds["seed"]
        fx.triggers.prune()
        await fx.channels[0].wait_closed()
        assert fx.triggers.open_channels == 0

    asyncio.run(scenario())


def test_a_retired_channel_is_closed_only_after_its_trigger_is_answered() -> None:
    async def scenario() -> None:
        fx = Fixture()
        fx.seeds["seed"] = "10.0.0.1:4000"
        trigger = fx.start("seed", "t1")
        await asyncio.sleep(0)
        fx.seeds["seed"] = "10.0.0.2:4000"  # the seed moved while its trigger is on the way
        fx.triggers.prune()
        await settle()
        old = fx.channels[0]
        assert not old.closed
        assert fx.triggers.open_channels == 1
        second = fx.start("seed", "t2")
        await asyncio.sleep(0)
        assert [c.address for c in fx.channels] == ["10.0.0.1:4000", "10.0.0.2:4000"]
        await old.answer(accepted=False)
        failure = await asyncio.wait_for(trigger, STEP_S)
        assert failure is not None
        assert "refused task t1" in failure.description  # the seed's own answer, not a cancellation
        await old.wait_closed()
        assert fx.triggers.open_channels == 1
        await fx.channels[1].answer()
        assert await asyncio.wait_for(second, STEP_S) is None
        assert not fx.channels[1].closed

    asyncio.run(scenario())


def test_a_seed_gone_before_its_trigger_ran_leaves_no_channel_behind() -> None:
    async def scenario() -> None:
        fx = Fixture()
        trigger = fx.start("gone", "t1")  # not a current seed: the engine forgot it meanwhile
        await asyncio.sleep(0)
        await fx.channels[0].answer()
        assert await asyncio.wait_for(trigger, STEP_S) is None
        await fx.channels[0].wait_closed()
        assert fx.triggers.open_channels == 0

    asyncio.run(scenario())


def test_close_closes_every_channel_and_a_later_trigger_fails_at_once() -> None:
    async def scenario() -> None:
        fx = Fixture()
        fx.seeds["a"] = "10.0.0.1:4000"
        fx.seeds["b"] = "10.0.0.2:4000"
        trigger = fx.start("a", "t1")
        await asyncio.sleep(0)
        fx.seeds["a"] = "10.0.0.3:4000"
        fx.triggers.prune()  # a's channel retired, its trigger still on it
        done = fx.start("b", "t2")
        await asyncio.sleep(0)
        await fx.channels[1].answer()
        await asyncio.wait_for(done, STEP_S)
        await fx.triggers.close()
        assert all(channel.closed for channel in fx.channels)
        assert fx.triggers.open_channels == 0
        trigger.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trigger
        failure = await asyncio.wait_for(fx.start("b", "t3"), STEP_S)
        assert failure is not None
        assert "stopping" in failure.description
        assert len(fx.channels) == 2

    asyncio.run(scenario())
