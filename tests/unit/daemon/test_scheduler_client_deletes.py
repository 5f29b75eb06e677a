"""DeleteTasks a scheduler could not take are kept and sent again (daemon/scheduler_client.py rules).

The client is real; only its gRPC stub is replaced at the edge by one that answers as a scheduler would
(OK, or an AioRpcError with the given code)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from dfly.api import scheduler_pb2 as pb
from dfly.daemon import scheduler_client
from dfly.daemon.scheduler_client import SchedulerClient


class Stub:
    """Answers DeleteTask with `answer` (None = OK) and records what was taken."""

    def __init__(self) -> None:
        self.answer: grpc.StatusCode | None = None
        self.taken: list[str] = []

    async def DeleteTask(self, request: pb.DeleteTaskRequest, **options: float) -> pb.Empty:
        if self.answer is not None:
            raise grpc.aio.AioRpcError(self.answer, grpc.aio.Metadata(), grpc.aio.Metadata(), "test", "")
        self.taken.append(request.task_id)
        return pb.Empty()


def client(holds: Callable[[str], bool] = lambda task_id: False) -> tuple[SchedulerClient, Stub]:
    made = SchedulerClient(
        "127.0.0.1:1",
        host_info=lambda: pb.HostInfo(host_id="h1"),
        finished_tasks=lambda only: [],
        load=lambda: (0.0, 0),
        keepalive_interval_s=5.0,
        holds_task=holds,
    )
    stub = Stub()
    made.stub = stub  # type: ignore[assignment]
    return made, stub


async def flushed(made: SchedulerClient) -> None:
    made._flush_soon()
    if made._flushing is not None:
        await made._flushing


def test_a_delete_while_not_connected_is_sent_once_connected() -> None:
    async def scenario() -> None:
        made, stub = client()
        await made.delete_task("t1")
        assert list(made.undelivered) == ["t1"]
        assert stub.taken == []
        made.connected.set()
        await flushed(made)
        assert stub.taken == ["t1"]
        assert not made.undelivered
        await made.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("code", "kept"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False),  # never taken: not sent again
        (grpc.StatusCode.UNIMPLEMENTED, False),  # a scheduler without DeleteTask
    ],
)
def test_a_failed_delete_is_kept_unless_it_can_never_be_taken(code: grpc.StatusCode, kept: bool) -> None:
    async def scenario() -> None:
        made, stub = client()
        made.connected.set()
        stub.answer = code
        await made.delete_task("t1")
        assert ("t1" in made.undelivered) is kept
        stub.answer = None
        await flushed(made)
        assert stub.taken == (["t1"] if kept else [])
        await made.close()

    asyncio.run(scenario())


def test_a_task_held_again_is_not_deleted_later() -> None:
    """Downloaded again before the scheduler answered: the announce reports it; a DeleteTask would undo it."""
    held: set[str] = set()

    async def scenario() -> None:
        made, stub = client(lambda task_id: task_id in held)
        await made.delete_task("t1")
        await made.delete_task("t2")
        held.add("t1")
        made.connected.set()
        await flushed(made)
        assert stub.taken == ["t2"]
        assert not made.undelivered
        await made.close()

    asyncio.run(scenario())


def test_at_most_max_undelivered_are_kept_the_oldest_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_client, "MAX_UNDELIVERED", 3)

    async def scenario() -> None:
        made, _ = client()
        for n in range(5):
            await made.delete_task(f"t{n}")
        assert list(made.undelivered) == ["t2", "t3", "t4"]
        await made.close()

    asyncio.run(scenario())
