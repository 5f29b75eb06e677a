"""Benchmark: the CPU one real scheduler process spends per progress report, against its core alone.

`dfly sim` times the scheduler's pure core (SchedulerEngine) and reports its CPU per simulated second;
a real scheduler also decodes each AnnouncePeer message from gRPC and runs its asyncio service around
the core. This bench measures both in the same run on the same messages:
- process: `dfly scheduler` as its own process on 127.0.0.1; this process announces `--hosts` hosts,
  registers one origin reader (need_back_to_source, then BackToSourceStarted) and `--peers` downloading
  peers of one task on AnnouncePeer streams (their replies are drained), then sends `--reports`
  PiecesFinished messages of `--pieces-per-report` pieces each, round robin over the streams, each
  naming the origin reader as the parent with a measured cost (the shape of the simulator's traffic:
  ~17 pieces per report at Kraken's scale). Its CPU (utime + stime from /proc) from the end of the
  set-up until it has gone quiet after the last report is divided by the number of reports;
- core: the same messages, converted as the service converts them (`scheduler.convert`), applied to an
  in-process SchedulerEngine, timed with `time.process_time`.
Prints ONE JSON line: `process_us_per_report`, `core_us_per_report`, `process_over_core`, and the
reports per second one core sustains at the process figure. Exits 1 (reason on stderr, no figures) if
the scheduler does not start or a stream fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netns.netns import process_cpu_s

from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc
from dfly.cluster import DEFAULT_SCHEDULER_CMD, scheduler_config
from dfly.scheduler import convert
from dfly.scheduler.core.config import EngineConfig
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.core.messages import Event, PeerRegistered

TASK_ID = "f" * 64
URL = "http://origin.test/blob"
PIECE_LENGTH = 4 << 20
READY_S = 30.0
STREAMS_PER_CHANNEL = 100


class BenchError(Exception):
    pass


def host_request(i: int) -> pb.AnnounceHostRequest:
    return pb.AnnounceHostRequest(
        host=pb.HostInfo(
            host_id=f"10.0.{i // 250}.{i % 250 + 1}-h{i}",
            hostname=f"h{i}",
            ip=f"10.0.{i // 250}.{i % 250 + 1}",
            piece_port=4005,
            control_port=4000,
            boot_id="boot-1",
            upload_slots=50,
        )
    )


def digest(number: int) -> int:
    return zlib.crc32(number.to_bytes(4, "big"))


def conversation(peers: int, reports: int, per_report: int) -> tuple[list[pb.AnnouncePeerRequest], list[int]]:
    """The messages in order, and for each the index of the stream (peer) that sends it."""
    piece_count = max(1, reports * per_report // max(1, peers)) + per_report
    content_length = piece_count * PIECE_LENGTH
    messages: list[pb.AnnouncePeerRequest] = []
    streams: list[int] = []

    def add(k: int, **oneof: Any) -> None:
        messages.append(pb.AnnouncePeerRequest(host_id=host_request(k).host.host_id, task_id=TASK_ID,
                                               peer_id=f"peer-{k}", **oneof))  # fmt: skip
        streams.append(k)

    for k in range(peers + 1):  # peer 0 reads the origin
        download = pb.Download(url=URL, need_back_to_source=k == 0)
        add(k, register=pb.RegisterPeer(download=download))
    layout = pb.BackToSourceStarted(content_length=content_length, piece_length=PIECE_LENGTH)
    add(0, back_to_source_started=layout)
    from_origin = [pb.PieceDone(number=n, digest=digest(n)) for n in range(piece_count)]
    add(0, pieces_finished=pb.PiecesFinished(pieces=from_origin))
    for k in range(1, peers + 1):
        add(k, started=pb.PeerStarted())
    next_piece = [0] * (peers + 1)
    for r in range(reports):
        k = 1 + r % peers
        first = next_piece[k]
        numbers = [(first + j) % piece_count for j in range(per_report)]
        next_piece[k] = (first + per_report) % piece_count
        done = [pb.PieceDone(number=n, digest=digest(n), parent_id="peer-0", cost_ms=40 + n % 7)
                for n in numbers]  # fmt: skip
        add(k, pieces_finished=pb.PiecesFinished(pieces=done))
    return messages, streams


def core_us_per_report(hosts: int, messages: list[pb.AnnouncePeerRequest], reports: int) -> float:
    engine = SchedulerEngine(EngineConfig(startup_grace_s=0), random.Random(0))
    now = 0.0
    for i in range(hosts):
        engine.handle(convert.host_announced(host_request(i)), now)
    setup, timed = messages[: len(messages) - reports], messages[len(messages) - reports :]

    def event_of(message: pb.AnnouncePeerRequest) -> Event:
        if message.WhichOneof("request") == "register":
            spec = convert.download_spec(message.register.download)
            return PeerRegistered(message.peer_id, message.host_id, message.task_id, spec)
        event = convert.peer_event(message, message.peer_id)
        if event is None:
            raise BenchError(f"no event for {message.WhichOneof('request')}")
        return event

    for message in setup:
        now += 0.001
        engine.handle(event_of(message), now)
    started = time.process_time()
    for message in timed:
        now += 0.001
        engine.handle(event_of(message), now)
    return (time.process_time() - started) * 1e6 / reports


def start_scheduler(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    # Its hosts open no keepalive stream: keep them for the whole run.
    extra = {"scheduling": {"startup_grace_s": 0}, "keepalive_wait_s": 86400}
    config = scheduler_config(log_level="warning") | extra
    (work / "scheduler.yaml").write_text(yaml.safe_dump(config))
    ready = work / "scheduler.ready"
    with (work / "scheduler.log").open("wb") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [*DEFAULT_SCHEDULER_CMD, "--config", str(work / "scheduler.yaml"), "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + READY_S
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"the scheduler did not start: {(work / 'scheduler.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(json.loads(ready.read_text())["ports"]["grpc"])


async def idle_cpu_s(pid: int, quiet_s: float = 0.25, limit_s: float = 60.0) -> float:
    """The process's CPU seconds once it has gone quiet (< 10 ms of CPU in `quiet_s`): every message
    written has been processed, whatever order its streams were read in."""
    deadline = time.monotonic() + limit_s
    last = process_cpu_s([pid])
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = process_cpu_s([pid])
        if now - last < 0.01:
            return now
        last = now
    raise BenchError(f"the scheduler was still busy {limit_s:g} s after the last report")


async def drain(call: Any) -> None:
    """Read a stream's replies (candidate parents and the like) so the scheduler never blocks on them."""
    try:
        async for _ in call:
            pass
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


async def drive(port: int, pid: int, hosts: int, messages: list[pb.AnnouncePeerRequest], streams: list[int],
                reports: int) -> float:  # fmt: skip
    """Send the conversation; returns the scheduler's CPU seconds over the reports.

    Daemons each have their own connection; here STREAMS_PER_CHANNEL streams share one (one connection
    carrying thousands of streams fails inside gRPC's core)."""
    count = 1 + len(set(streams)) // STREAMS_PER_CHANNEL
    channels = [aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(count)]
    stubs = [scheduler_pb2_grpc.SchedulerStub(channel) for channel in channels]
    calls: dict[int, Any] = {}
    drains: list[asyncio.Task[None]] = []
    setup = len(messages) - reports
    cpu_before = 0.0
    try:
        for i in range(hosts):
            await stubs[0].AnnounceHost(host_request(i), timeout=10)
        for index, (message, k) in enumerate(zip(messages, streams, strict=True)):
            if index == setup:
                cpu_before = await idle_cpu_s(pid)  # the set-up is processed and answered
            call = calls.get(k)
            if call is None:
                call = calls[k] = stubs[k % count].AnnouncePeer()  # type: ignore[call-arg]  # written below
                drains.append(asyncio.create_task(drain(call)))
            await call.write(message)
        await stubs[0].StatTask(pb.StatTaskRequest(task_id=TASK_ID), timeout=30)
        return await idle_cpu_s(pid) - cpu_before
    finally:
        for call in calls.values():
            call.cancel()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        await asyncio.gather(*(channel.close(None) for channel in channels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=200, help="hosts announced (>= peers + 1)")
    parser.add_argument("--peers", type=int, default=199, help="downloading peers, each on its own stream")
    parser.add_argument("--reports", type=int, default=20000)
    parser.add_argument("--pieces-per-report", type=int, default=17)
    args = parser.parse_args(argv)
    if args.peers < 1 or args.hosts < args.peers + 1 or args.reports < 1 or args.pieces_per_report < 1:
        parser.error("need peers >= 1, hosts >= peers + 1, reports >= 1, pieces-per-report >= 1")
    messages, streams = conversation(args.peers, args.reports, args.pieces_per_report)
    core_us = core_us_per_report(args.hosts, messages, args.reports)
    with tempfile.TemporaryDirectory(prefix="dfly-scheduler-load-") as tmp:
        try:
            proc, port = start_scheduler(Path(tmp))
        except BenchError as exc:
            print(f"scheduler_load: {exc}", file=sys.stderr)
            return 1
        try:
            cpu_s = asyncio.run(drive(port, proc.pid, args.hosts, messages, streams, args.reports))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, BenchError, OSError) as exc:
            print(f"scheduler_load: {exc}", file=sys.stderr)
            return 1
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    process_us = cpu_s * 1e6 / args.reports
    print(json.dumps({
        "bench": "scheduler_load",
        "hosts": args.hosts, "peers": args.peers, "reports": args.reports,
        "pieces_per_report": args.pieces_per_report,
        "process_us_per_report": round(process_us, 1),
        "core_us_per_report": round(core_us, 1),
        "process_over_core": round(process_us / core_us, 2) if core_us > 0 else None,
        "reports_per_cpu_s": round(1e6 / process_us) if process_us > 0 else None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
