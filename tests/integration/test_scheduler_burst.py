"""A burst of AnnouncePeer streams, as when thousands of hosts start one download at the same moment.

A real `dfly scheduler` process is paused (SIGSTOP) while 2,500 peers, each on its own stream, write their
registration; on SIGCONT gRPC's core reads all of them at once, far faster than the Python server can
take them. With gRPC's default limits on such not-yet-taken calls (1,000, then random rejection up to
3,000) hundreds of streams end CANCELLED without the scheduler ever seeing them; the daemon behind each
would have to register again or go to the origin. The scheduler raises the limits (`app.py`): every
stream must stay open and the task must count every peer.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc
from dfly.cluster import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PEERS = 2500
STREAMS_PER_CHANNEL = 100  # channels stand for daemons' connections (thousands on one fail inside gRPC)
TASK_ID = "b" * 64
STEP_S = 30.0


def host(i: int) -> pb.AnnounceHostRequest:
    ip = f"10.1.{i // 250}.{i % 250 + 1}"
    return pb.AnnounceHostRequest(
        host=pb.HostInfo(
            host_id=f"{ip}-burst{i}",
            hostname=f"burst{i}",
            ip=ip,
            piece_port=4005,
            control_port=4000,
            boot_id="boot-1",
            upload_slots=10,
        )
    )


def register(i: int) -> pb.AnnouncePeerRequest:
    download = pb.Download(url="http://origin.test/burst.bin")
    return pb.AnnouncePeerRequest(host_id=host(i).host.host_id, task_id=TASK_ID, peer_id=f"burst-peer-{i}",
                                  register=pb.RegisterPeer(download=download))  # fmt: skip


async def burst(port: int, scheduler_pid: int) -> tuple[list[str], int]:
    """Register PEERS peers while the scheduler is paused; (the status of each stream that ended, the
    task's peer count)."""
    channels = [aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(PEERS // STREAMS_PER_CHANNEL)]
    stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in channels]
    calls: list[Any] = []
    try:
        for start in range(0, PEERS, 250):  # every channel connected and every host known first
            await asyncio.gather(*(stubs[i % len(stubs)].AnnounceHost(host(i), timeout=STEP_S)
                                   for i in range(start, min(PEERS, start + 250))))  # fmt: skip
        os.kill(scheduler_pid, signal.SIGSTOP)
        try:
            for i in range(PEERS):
                call = stubs[i % len(stubs)].AnnouncePeer()  # type: ignore[call-arg]  # written below
                calls.append(call)
                await asyncio.wait_for(call.write(register(i)), STEP_S)
        finally:
            os.kill(scheduler_pid, signal.SIGCONT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP_S
        count = 0
        while loop.time() < deadline:  # until the scheduler has taken every registration (or given up)
            stat = await stubs[0].StatTask(pb.StatTaskRequest(task_id=TASK_ID), timeout=STEP_S)
            count = stat.peer_count
            if count >= PEERS or any(call.done() for call in calls):
                break
            await asyncio.sleep(0.1)
        return [f"{(await call.code()).name}: {await call.details()}" for call in calls if call.done()], count
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*(channel.close(None) for channel in channels))


# The seed cannot fetch the made-up URL, so the source fallbacks would end the streams a slow machine has
# not counted yet: they wait longer than the test, which is about the burst alone.
NO_FALLBACK = {"scheduling": {"source_start_timeout_s": 3600, "seed_register_timeout_s": 3600}}


def test_a_burst_of_registrations_loses_no_stream(tmp_path: Path) -> None:
    with LocalCluster(
        tmp_path / "c", peers=0, log_level="warning", scheduler_overrides=NO_FALLBACK
    ) as cluster:
        ended, count = asyncio.run(burst(cluster.scheduler.ports["grpc"], cluster.scheduler.pid))
        assert not ended, f"{len(ended)} of {PEERS} streams ended, e.g. {ended[0]}"
        assert count == PEERS
