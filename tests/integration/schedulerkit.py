"""Shared pieces of the scheduler's gRPC tests: the HostInfo of a test host on 127.0.0.1, and a
DfdaemonControl servicer (a fake seed's control port) served on 127.0.0.1 for the block's life."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpc import aio

from dfly.api import daemon_pb2_grpc
from dfly.api import scheduler_pb2 as pb


@asynccontextmanager
async def control_server(control: daemon_pb2_grpc.DfdaemonControlServicer) -> AsyncIterator[int]:
    """Serve `control` on 127.0.0.1; yields its port."""
    server = aio.server()
    daemon_pb2_grpc.add_DfdaemonControlServicer_to_server(control, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def host(name: str, *, seed: bool = False, control_port: int = 4000) -> pb.HostInfo:
    return pb.HostInfo(
        host_id=f"127.0.0.1-{name}",
        hostname=name,
        ip="127.0.0.1",
        piece_port=4005,
        control_port=control_port,
        seed=seed,
        boot_id="boot-1",
        upload_slots=10,
    )
