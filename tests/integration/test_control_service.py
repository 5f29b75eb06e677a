"""The control service (port 4000) makes a daemon fetch, so only trusted schedulers may call it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from clusterkit import needs_ipv6

from dfly.api import daemon_pb2 as dpb
from dfly.api import daemon_pb2_grpc as dpb_grpc
from dfly.api import scheduler_pb2 as pb
from dfly.daemon.services import ControlService, TrustedSchedulers, peer_ip
from dfly.daemon.task_request import TaskRequest

pytestmark = pytest.mark.integration


async def call_download_task(
    trusted: list[str], download: pb.Download | None = None, ip: str = "127.0.0.1", task_id: str = ""
) -> tuple[grpc.StatusCode | None, list[TaskRequest]]:
    triggered: list[TaskRequest] = []

    def trigger(request: TaskRequest) -> str:
        triggered.append(request)
        return "t" * 64

    server = grpc.aio.server()
    dpb_grpc.add_DfdaemonControlServicer_to_server(
        ControlService(TrustedSchedulers(trusted), trigger), server
    )
    address = f"[{ip}]" if ":" in ip else ip
    port = server.add_insecure_port(f"{address}:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"{address}:{port}") as channel:
            stub = dpb_grpc.DfdaemonControlStub(channel)
            wanted = download or pb.Download(url="http://origin.example/f")
            request = dpb.DownloadTaskRequest(task_id=task_id, download=wanted)
            try:
                reply = await stub.DownloadTask(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), triggered
            assert reply.accepted
            assert reply.task_id == "t" * 64
            return None, triggered
    finally:
        await server.stop(0)


def test_untrusted_caller_is_refused_and_nothing_is_fetched() -> None:
    code, triggered = asyncio.run(call_download_task(["192.0.2.10"]))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert triggered == []


@needs_ipv6
def test_a_trusted_scheduler_over_ipv6_is_recognised() -> None:
    """gRPC names an IPv6 caller percent-encoded (`ipv6:%5B::1%5D:port`): every seed trigger over IPv6
    was refused, even with the scheduler's IP listed, so no download over IPv6 ever had a seed."""
    code, triggered = asyncio.run(call_download_task(["::1"], ip="::1"))
    assert code is None
    assert len(triggered) == 1


@pytest.mark.parametrize("trusted", ["127.0.0.1", "localhost"])
def test_trusted_scheduler_triggers_a_back_to_source_download(trusted: str) -> None:
    """By IP, or by the host name `scheduler.addrs` gives (the default trust list), resolved."""
    code, triggered = asyncio.run(call_download_task([trusted]))
    assert code is None
    [request] = triggered
    assert request.url == "http://origin.example/f"
    assert request.need_back_to_source


def test_the_requesters_empty_filter_list_is_kept() -> None:
    """A peer's `--no-default-filters` (no filter at all) reaches the seed as an empty list: it was taken
    for the default list, so the seed fetched another task than its peers waited for."""
    url = "http://origin.example/f?X-Amz-Signature=abc"
    wanted = TaskRequest(url, filtered_query_params=())
    download = pb.Download(url=url)  # no filtered_query_params: the requester's effective list is empty
    code, triggered = asyncio.run(call_download_task(["127.0.0.1"], download, task_id=wanted.task_id))
    assert code is None
    [request] = triggered
    assert (request.filtered_query_params, request.task_id) == ((), wanted.task_id)


def test_a_trigger_for_another_task_id_is_refused_and_nothing_is_fetched() -> None:
    """The seed would fetch a task nobody waits for (it only logged the mismatch); refused, the scheduler
    lets a peer read the origin at once instead of waiting for the seed."""
    code, triggered = asyncio.run(call_download_task(["127.0.0.1"], task_id="f" * 64))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert triggered == []


@pytest.mark.parametrize(
    "download",
    [
        pb.Download(url="http://origin.example/f", piece_length=1000),
        pb.Download(url="http://origin.example/f", piece_length=1 << 30),
        pb.Download(url="ftp://origin.example/f"),
        pb.Download(url="http://origin.example/../../etc/passwd?x=1", piece_length=-(1 << 20)),
        # a timeout the local API refuses too (NaN and -1 failed the attempt at once, inf never ended it)
        pb.Download(url="http://origin.example/f", timeout_s=float("nan")),
        pb.Download(url="http://origin.example/f", timeout_s=-1),
        pb.Download(url="http://origin.example/f", timeout_s=float("inf")),
        # request headers beyond what a client could send, all of them for the origin
        pb.Download(url="http://origin.example/f", request_headers={f"x-{n}": "v" for n in range(20_000)}),
    ],
)
def test_invalid_trigger_is_refused_and_nothing_is_fetched(download: pb.Download) -> None:
    code, triggered = asyncio.run(call_download_task(["127.0.0.1"], download))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert triggered == []


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B::1%5D:5555", "::1"),  # as grpcio 1.85 gives it
        ("ipv6:%5Bfe80::1%25eth0%5D:5555", "fe80::1%eth0"),
        ("unix:/tmp/x", ""),
    ],
)
def test_peer_ip(peer: str, ip: str) -> None:
    assert peer_ip(peer) == ip
