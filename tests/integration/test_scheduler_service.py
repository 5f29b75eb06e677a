"""The real scheduler (app.run → grpc.aio server) on 127.0.0.1, port 0, driven through a real stub.

A fake DfdaemonControl server plays the seed host's control port, so the seed trigger is a real gRPC call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from schedulerkit import control_server, host

from dfly.api import daemon_pb2, daemon_pb2_grpc, scheduler_pb2_grpc
from dfly.api import scheduler_pb2 as pb
from dfly.daemon.scheduler_client import SchedulerClient
from dfly.scheduler import app
from dfly.scheduler import service as service_module
from dfly.scheduler.config import MetricsSection, SchedulerConfig
from dfly.scheduler.core.config import EngineConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

STEP_S = 5.0  # bound on every single await of the conversation
END_OF_STREAM: Any = aio.EOF  # type: ignore[attr-defined]


class FakeSeedControl(daemon_pb2_grpc.DfdaemonControlServicer):
    def __init__(self) -> None:
        self.requests: asyncio.Queue[daemon_pb2.DownloadTaskRequest] = asyncio.Queue()

    async def DownloadTask(self, request: daemon_pb2.DownloadTaskRequest, context: Any) -> Any:
        self.requests.put_nowait(request)
        return daemon_pb2.DownloadTaskResponse(task_id=request.task_id, accepted=True)


@dataclass
class Running:
    stub: Any
    ports: dict[str, int]


@asynccontextmanager
async def scheduler(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scheduling: EngineConfig | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    keepalive_wait_s: float = 60.0,
) -> AsyncIterator[Running]:
    ready = asyncio.Event()
    original = app.write_ready_file

    def write_and_signal(path: Path, grpc_port: int, metrics_port: int) -> None:
        original(path, grpc_port, metrics_port)
        ready.set()

    monkeypatch.setattr(app, "write_ready_file", write_and_signal)
    # No start-up grace: these scenarios start the scheduler and decide at once (the grace is tested on
    # the engine, tests/unit/scheduler, and end to end in test_scheduler_restart.py).
    engine = scheduling or EngineConfig(startup_grace_s=0)
    config = SchedulerConfig(
        listen_ip="127.0.0.1",
        port=0,
        metrics=MetricsSection(port=0),
        scheduling=engine,
        max_message_bytes=max_message_bytes,
        keepalive_wait_s=keepalive_wait_s,
    )
    ready_file = tmp_path / "scheduler.json"
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(config, ready_file, stop))
    try:
        await asyncio.wait_for(ready.wait(), STEP_S)
        content = json.loads(ready_file.read_text())
        assert content["role"] == "scheduler"
        assert content["ports"]["grpc"] > 0
        async with aio.insecure_channel(f"127.0.0.1:{content['ports']['grpc']}") as channel:
            yield Running(scheduler_pb2_grpc.SchedulerStub(channel), content["ports"])
    finally:
        stop.set()
        await asyncio.wait_for(runner, STEP_S)


@asynccontextmanager
async def seed_control(
    control: FakeSeedControl | None = None,
) -> AsyncIterator[tuple[FakeSeedControl, int]]:
    control = control or FakeSeedControl()
    async with control_server(control) as port:
        yield control, port


def register(
    host_name: str,
    peer_id: str,
    *,
    need_back_to_source: bool = False,
    disable_back_to_source: bool = False,
    task_id: str = "task-1",
) -> pb.AnnouncePeerRequest:
    download = pb.Download(
        url=f"http://origin.test/{task_id}",
        need_back_to_source=need_back_to_source,
        disable_back_to_source=disable_back_to_source,
    )
    return pb.AnnouncePeerRequest(
        host_id=f"127.0.0.1-{host_name}",
        task_id=task_id,
        peer_id=peer_id,
        register=pb.RegisterPeer(download=download),
    )


async def read(call: Any) -> pb.AnnouncePeerResponse:
    response = await asyncio.wait_for(call.read(), STEP_S)
    assert response is not END_OF_STREAM
    return response  # type: ignore[no-any-return]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_seed_trigger_then_candidate_parents_then_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with seed_control() as (control, control_port), scheduler(tmp_path, monkeypatch) as running:
            stub = running.stub
            await stub.AnnounceHost(
                pb.AnnounceHostRequest(host=host("seed", seed=True, control_port=control_port))
            )
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))

            child = stub.AnnouncePeer()
            await child.write(register("child", "child-peer"))
            trigger = await asyncio.wait_for(control.requests.get(), STEP_S)
            assert trigger.task_id == "task-1"
            assert trigger.download.need_back_to_source

            seed = stub.AnnouncePeer()
            await seed.write(register("seed", "seed-peer", need_back_to_source=True))
            assert (await read(seed)).WhichOneof("response") == "need_back_to_source"
            started = pb.BackToSourceStarted(content_length=3 * 65536, piece_length=65536)
            await seed.write(
                pb.AnnouncePeerRequest(peer_id="seed-peer", task_id="task-1", back_to_source_started=started)
            )

            answer = await read(child)
            assert answer.WhichOneof("response") == "candidate_parents"
            assert [p.peer_id for p in answer.candidate_parents.parents] == ["seed-peer"]
            assert answer.candidate_parents.layout.piece_length == 65536

            pieces = pb.PiecesFinished(pieces=[pb.PieceDone(number=n, digest=10 + n) for n in range(3)])
            await seed.write(pb.AnnouncePeerRequest(peer_id="seed-peer", pieces_finished=pieces))
            stat = await stub.StatTask(pb.StatTaskRequest(task_id="task-1"))
            assert (stat.state, stat.content_length, stat.peer_count) == ("RUNNING", 3 * 65536, 2)
            assert list(stat.piece_digests) == [10, 11, 12]

            await child.write(pb.AnnouncePeerRequest(finished=pb.PeerFinished(piece_digests=[10, 11, 12])))
            verdict = await read(child)
            assert verdict.finish_verdict.accepted
            await child.done_writing()
            await seed.done_writing()
            assert await asyncio.wait_for(child.read(), STEP_S) is END_OF_STREAM

            with pytest.raises(aio.AioRpcError) as missing:
                await stub.StatTask(pb.StatTaskRequest(task_id="no-such-task"))
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND

            metrics = await asyncio.to_thread(fetch_metrics, running.ports["metrics"])
            assert "dfly_scheduler_registered_peers_total 2.0" in metrics
            assert 'dfly_scheduler_seed_triggers_total{result="sent"} 1.0' in metrics

    run(scenario)


def test_unreachable_seed_sends_the_child_to_the_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with seed_control() as (_, closed_port):
            pass  # the port is closed again: DownloadTask is refused
        async with scheduler(tmp_path, monkeypatch) as running:
            stub = running.stub
            await stub.AnnounceHost(
                pb.AnnounceHostRequest(host=host("seed", seed=True, control_port=closed_port))
            )
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))
            child = stub.AnnouncePeer()
            await child.write(register("child", "child-peer"))
            answer = await read(child)
            assert answer.WhichOneof("response") == "need_back_to_source"
            await child.done_writing()

    run(scenario)


class OutOfDescriptorsOnce(FakeSeedControl):
    """The first trigger fails as a scheduler out of descriptors sees it (grpc's UNAVAILABLE, its socket
    error in the details); the seed itself is fine."""

    async def DownloadTask(self, request: daemon_pb2.DownloadTaskRequest, context: Any) -> Any:
        if self.requests.empty():
            self.requests.put_nowait(request)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "socket: Too many open files")
        return await super().DownloadTask(request, context)


def test_a_trigger_failing_for_the_schedulers_own_descriptors_does_not_suspend_the_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        control = OutOfDescriptorsOnce()
        async with seed_control(control) as (_, port), scheduler(tmp_path, monkeypatch) as running:
            stub = running.stub
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("seed", seed=True, control_port=port)))
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))
            first = stub.AnnouncePeer()
            await first.write(register("child", "child-peer-1", task_id="task-1"))
            assert (await read(first)).WhichOneof("response") == "need_back_to_source"
            second = stub.AnnouncePeer()
            await second.write(register("child", "child-peer-2", task_id="task-2"))
            await asyncio.wait_for(control.requests.get(), STEP_S)  # the failed one
            trigger = await asyncio.wait_for(control.requests.get(), STEP_S)
            assert trigger.task_id == "task-2"  # the seed was asked again, not suspended
            for call in (first, second):
                await call.done_writing()

    run(scenario)


def test_requests_out_of_order_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch) as running:
            stub = running.stub
            early = stub.AnnouncePeer()
            await early.write(pb.AnnouncePeerRequest(peer_id="p", finished=pb.PeerFinished()))
            with pytest.raises(aio.AioRpcError) as refused:
                await read(early)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT

            stranger = stub.AnnouncePeer()
            await stranger.write(register("nobody", "p2"))
            with pytest.raises(aio.AioRpcError) as unknown:
                await read(stranger)
            assert unknown.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "has not announced" in (unknown.value.details() or "")

            keepalive = stub.HostKeepAlive()
            await keepalive.write(pb.HostKeepAliveRequest(host_id="127.0.0.1-nobody"))
            with pytest.raises(aio.AioRpcError) as not_announced:
                await asyncio.wait_for(keepalive, STEP_S)
            assert not_announced.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    run(scenario)


def test_impossible_piece_lengths_and_layouts_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch) as running:
            stub = running.stub
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("odd")))
            bad_register = register("odd", "odd-1")
            bad_register.register.download.piece_length = 1000
            refused = stub.AnnouncePeer()
            await refused.write(bad_register)
            with pytest.raises(aio.AioRpcError) as not_a_power:
                await read(refused)
            assert not_a_power.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "power of two" in (not_a_power.value.details() or "")

            peer = stub.AnnouncePeer()
            await peer.write(register("odd", "odd-2", need_back_to_source=True))
            assert (await read(peer)).WhichOneof("response") == "need_back_to_source"
            started = pb.BackToSourceStarted(content_length=1 << 20, piece_length=3)
            await peer.write(pb.AnnouncePeerRequest(peer_id="odd-2", back_to_source_started=started))
            with pytest.raises(aio.AioRpcError) as bad_layout:
                await read(peer)
            assert bad_layout.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid layout" in (bad_layout.value.details() or "")

    run(scenario)


def test_oversized_and_malformed_messages_are_refused_and_the_scheduler_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch, max_message_bytes=2 * 1024 * 1024) as running:
            stub = running.stub
            digests = [2**31 + i for i in range(600_000)]  # ~3 MB of piece CRCs: over the 2 MiB limit
            big = pb.AnnounceHostRequest(
                host=host("big"),
                finished_tasks=[
                    pb.FinishedTask(task_id="t", content_length=1, piece_length=65536, piece_digests=digests)
                ],
            )
            with pytest.raises(aio.AioRpcError) as oversized:
                await stub.AnnounceHost(big, timeout=STEP_S)
            assert oversized.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

            async with aio.insecure_channel(f"127.0.0.1:{running.ports['grpc']}") as channel:
                raw = channel.unary_unary(
                    "/dfly.scheduler.v1.Scheduler/AnnounceHost",
                    request_serializer=None,
                    response_deserializer=None,
                )
                with pytest.raises(aio.AioRpcError) as garbage:
                    await raw(b"\xff\xff\xff\xff not a protobuf", timeout=STEP_S)
                assert garbage.value.code() is grpc.StatusCode.UNKNOWN  # grpcio's answer to a parse error
                assert "Error parsing message" in (garbage.value.details() or "")

            await stub.AnnounceHost(
                pb.AnnounceHostRequest(host=host("fine")), timeout=STEP_S
            )  # still serving

    run(scenario)


def test_a_host_holding_more_than_one_message_of_tasks_announces_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed with a big cache lists more piece digests than one message may carry (here 4 MiB of them
    against a 2 MiB max_message_bytes): the daemon's announce goes in chunks, every task arrives."""

    def finished(only: Collection[str] | None = None) -> list[pb.FinishedTask]:
        tasks = [
            pb.FinishedTask(
                task_id=f"task-{n:04}",
                peer_id=f"127.0.0.1-big-stored-{n}",
                content_length=256 * 65536,
                piece_length=65536,
                piece_digests=[2**31 + n * 256 + i for i in range(256)],  # ~1.3 KB each
                url=f"http://origin.test/{n}",
            )
            for n in range(4000)
        ]
        return tasks if only is None else [t for t in tasks if t.task_id in only]

    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch, max_message_bytes=2 * 1024 * 1024) as running:
            client = SchedulerClient(
                f"127.0.0.1:{running.ports['grpc']}",
                host_info=lambda: host("big"),
                finished_tasks=finished,
                load=lambda: (0.0, 0),
                keepalive_interval_s=5.0,
            )
            try:
                assert sum(t.ByteSize() for t in finished(None)) > 2 * (2 * 1024 * 1024)
                await client.announce(timeout_s=STEP_S)
                for task_id in ("task-0000", "task-2000", "task-3999"):
                    stat = await running.stub.StatTask(pb.StatTaskRequest(task_id=task_id), timeout=STEP_S)
                    assert stat.peer_count == 1
                await client.announce(timeout_s=STEP_S, only=["task-0042"])  # one task: one small message
            finally:
                await client.close()

    run(scenario)


def test_a_host_that_never_opens_its_keepalive_stream_is_not_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An announce alone (no keepalive stream: no daemon behaves so) does not keep a host, and the tasks
    it claims, offered as parents for good."""

    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch, keepalive_wait_s=0.3) as running:
            ghost = pb.FinishedTask(
                task_id="task-1",
                peer_id="127.0.0.1-ghost-stored",
                content_length=65536,
                piece_length=65536,
                piece_digests=[7],
                url="http://origin.test/task-1",
            )
            await running.stub.AnnounceHost(
                pb.AnnounceHostRequest(host=host("ghost"), finished_tasks=[ghost])
            )
            await running.stub.AnnounceHost(pb.AnnounceHostRequest(host=host("child")))
            keepalive = running.stub.HostKeepAlive()
            await keepalive.write(pb.HostKeepAliveRequest(host_id="127.0.0.1-child", boot_id="boot-1"))
            deadline = asyncio.get_running_loop().time() + STEP_S
            while (await asyncio.to_thread(fetch_metrics, running.ports["metrics"])).count(
                "dfly_scheduler_hosts_connected 1.0"
            ) == 0:  # the child alone
                assert asyncio.get_running_loop().time() < deadline, "the ghost stayed connected"
                await asyncio.sleep(0.05)
            child = running.stub.AnnouncePeer()
            await child.write(register("child", "127.0.0.1-child-p1"))
            assert (await read(child)).WhichOneof("response") == "need_back_to_source"  # not the ghost
            await child.done_writing()
            await keepalive.done_writing()

    run(scenario)


def test_dropped_keepalive_suspends_and_the_retry_timer_fails_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        fast = EngineConfig(retry_interval_s=0.05, startup_grace_s=0)
        async with scheduler(tmp_path, monkeypatch, fast) as running:
            stub = running.stub
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("a")))
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("c")))
            origin_reader = stub.AnnouncePeer()
            await origin_reader.write(register("a", "peer-a"))
            assert (await read(origin_reader)).WhichOneof("response") == "need_back_to_source"
            started = pb.BackToSourceStarted(content_length=1024, piece_length=65536)
            await origin_reader.write(pb.AnnouncePeerRequest(back_to_source_started=started))

            keepalive = stub.HostKeepAlive()
            await keepalive.write(pb.HostKeepAliveRequest(host_id="127.0.0.1-a", boot_id="boot-1"))
            await keepalive.done_writing()
            await asyncio.wait_for(keepalive, STEP_S)  # the stream is gone: host a is suspended
            metrics = await asyncio.to_thread(fetch_metrics, running.ports["metrics"])
            assert "dfly_scheduler_hosts 2.0" in metrics  # a is still known (until host_ttl_s) ...
            assert "dfly_scheduler_hosts_connected 1.0" in metrics  # ... but not offered: an alert sees it

            child = stub.AnnouncePeer()
            await child.write(register("c", "peer-c", disable_back_to_source=True))
            failed = await read(child)  # five fallback retries of 50 ms, no parent
            assert failed.WhichOneof("response") == "failed"
            assert "no parent available" in failed.failed.description
            assert await asyncio.wait_for(child.read(), STEP_S) is END_OF_STREAM

            await origin_reader.done_writing()  # leaves without finishing
            assert await asyncio.wait_for(origin_reader.read(), STEP_S) is END_OF_STREAM
            with pytest.raises(aio.AioRpcError) as missing:  # no peer left: the task is forgotten
                await stub.StatTask(pb.StatTaskRequest(task_id="task-1"))
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND

    run(scenario)


def test_keepalive_of_a_host_that_left_ends_so_the_daemon_announces_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LeaveHost with this host's id (say, from a second daemon given the same id) made the scheduler
    forget a host whose own keepalive stream went on: every later registration was refused."""

    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch) as running:
            stub = running.stub
            await stub.AnnounceHost(pb.AnnounceHostRequest(host=host("a")))
            keepalive = stub.HostKeepAlive()
            beat = pb.HostKeepAliveRequest(host_id="127.0.0.1-a", boot_id="boot-1")
            await keepalive.write(beat)
            await stub.LeaveHost(pb.LeaveHostRequest(host_id="127.0.0.1-a"))
            # The scheduler may have ended the stream already: then this write fails (gRPC's INTERNAL
            # "execute_batch" on a loaded machine) and the stream's own status below is what counts.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await keepalive.write(beat)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(keepalive, STEP_S)
            assert ended.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "announce again" in (ended.value.details() or "")

    run(scenario)


def fetch_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=STEP_S) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def test_an_announce_stream_that_never_registers_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It held a stream slot and a reader task for as long as the client kept its connection."""
    monkeypatch.setattr(service_module, "REGISTER_TIMEOUT_S", 0.2)

    async def scenario() -> None:
        async with scheduler(tmp_path, monkeypatch) as running:
            silent = running.stub.AnnouncePeer()
            with pytest.raises(aio.AioRpcError) as ended:
                await asyncio.wait_for(silent.read(), STEP_S)
            assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no register within 0.2 s" in (ended.value.details() or "")

    run(scenario)
