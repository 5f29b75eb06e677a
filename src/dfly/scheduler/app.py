"""Composition root of `dfly scheduler`: config → engine → gRPC service → server, metrics, ready file.

Rules: the ready file (`{"role": "scheduler", "pid", "ports": {"grpc", "metrics"}}`) is written, to a
temporary name then renamed, only once the gRPC port is bound and serving; port 0 means the kernel's
choice and the real port is reported. `run` returns after `stop` is set and everything is shut down.
`main` is the `dfly scheduler` subcommand: SIGINT/SIGTERM stop cleanly (exit 0), a bad config is one
line on stderr (exit 2), any other DflyError one line (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from grpc import aio

from dfly.api import scheduler_pb2, scheduler_pb2_grpc
from dfly.common import ready_file as ready_files
from dfly.common.cli_args import OneLineParser
from dfly.common.errors import ConfigError, DflyError
from dfly.common.grpc_health import GrpcHealth
from dfly.common.limits import check_open_files_limit
from dfly.common.logging import setup_logging
from dfly.common.metrics_http import start_metrics_server
from dfly.common.net import host_port
from dfly.common.stop_signals import STOP_SIGNALS
from dfly.common.tls import add_port, channel_credentials
from dfly.scheduler.config import SchedulerConfig, load_scheduler_config
from dfly.scheduler.core.engine import SchedulerEngine
from dfly.scheduler.metrics import SchedulerMetrics
from dfly.scheduler.service import SchedulerService

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 1.0
SCHEDULER_DESCRIPTORS = 8192  # one connection per host: a few thousand hosts per scheduler, and room


class BindError(ConfigError):
    """A listener that cannot bind: a config error naming its key (exit 2), as the daemon's."""


def write_ready_file(path: Path, grpc_port: int, metrics_port: int) -> None:
    payload = {"role": "scheduler", "pid": os.getpid(), "ports": {"grpc": grpc_port, "metrics": metrics_port}}
    ready_files.write_ready_file(path, payload)


def _start_metrics(config: SchedulerConfig, metrics: SchedulerMetrics) -> tuple[WSGIServer | None, int]:
    if not config.metrics.enable:
        return None, 0
    try:
        server, _thread = start_metrics_server(config.metrics.ip, config.metrics.port, metrics.registry)
    except OSError as exc:
        raise BindError(
            f"metrics.ip / metrics.port: cannot listen on "
            f"{host_port(config.metrics.ip, config.metrics.port)}: {exc.strerror or exc}"
        ) from None
    return server, int(server.server_port)


def _stop_metrics(server: WSGIServer | None) -> None:
    if server is None:
        return
    stopper = threading.Thread(target=server.shutdown, name="metrics-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout=5)
    server.server_close()


# gRPC's core cancels incoming calls the server has not taken yet beyond 1,000 (at random, all beyond
# 3,000). Thousands of hosts starting one download register within a moment, faster than this one
# Python loop takes calls: measured 390 of 2,500 AnnouncePeer streams CANCELLED unseen
# (tests/integration/test_scheduler_burst.py). A waiting call holds only its first message; these bounds
# are far above any fleet one scheduler serves.
BURST_LIMITS = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 200_000),
]


def keepalive_options(every_s: float) -> list[tuple[str, int]]:
    """Server pings on every connection (with or without calls, never capped by a lack of data). gRPC
    core enforces the answer's deadline through its ping timeout, not the keepalive timeout (measured
    with grpcio 1.85: with the keepalive timeout alone a stopped client's connection was never closed)."""
    return [
        ("grpc.keepalive_time_ms", round(every_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(every_s * 500)),
        ("grpc.http2.ping_timeout_ms", round(every_s * 500)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


async def run(config: SchedulerConfig, ready_file: Path | None, stop: asyncio.Event) -> None:
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    engine = SchedulerEngine(config.scheduling, rng, started_at=asyncio.get_running_loop().time())
    metrics = SchedulerMetrics()
    tls = config.security.tls
    # Read once at start, as every other TLS file: a certificate rotated (or half-written) meanwhile must
    # not break each later seed trigger; new files take effect at a restart.
    credentials = channel_credentials(tls) if tls.enabled else None

    def seed_channel(address: str) -> aio.Channel:
        if credentials is None:
            return aio.insecure_channel(address)
        return aio.secure_channel(address, credentials)

    service = SchedulerService(
        engine,
        metrics,
        seed_trigger_timeout_s=config.seed_trigger.timeout_s,
        channel_factory=seed_channel,
        keepalive_wait_s=config.keepalive_wait_s,
    )
    await service.start()
    limits = [("grpc.max_receive_message_length", config.max_message_bytes), *BURST_LIMITS]
    server = aio.server(options=[*limits, *keepalive_options(config.grpc_keepalive_s)])
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    health = GrpcHealth(server, [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name])
    address = host_port(config.listen_ip, config.port)
    try:
        grpc_port = add_port(server, address, tls)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise BindError(f"listen_ip / port: cannot listen on {address}: {reason}") from None
    except RuntimeError:
        grpc_port = 0
    if grpc_port == 0:
        raise BindError(f"listen_ip / port: cannot listen on {address}")
    metrics_server, metrics_port = _start_metrics(config, metrics)
    try:
        await server.start()
        await health.start()
        log.info(
            "scheduler serving gRPC on %s, metrics on port %d",
            host_port(config.listen_ip, grpc_port),
            metrics_port,
        )
        if ready_file is not None:
            write_ready_file(ready_file, grpc_port, metrics_port)
        await stop.wait()
        log.info("scheduler stopping")
    finally:
        await health.shutdown()
        await service.stop()
        await server.stop(SHUTDOWN_GRACE_S)
        _stop_metrics(metrics_server)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="dfly scheduler", description="Run the dfly scheduler.")
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument("--ready-file", type=Path, default=None, help="write real ports here once serving")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (overrides the config; 0 = any)")
    return parser.parse_args(argv)


async def _serve(config: SchedulerConfig, ready_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await run(config, ready_file, stop)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        ready_files.check_ready_file(args.ready_file)
        config = load_scheduler_config(args.config)
        if args.port is not None:
            if not 0 <= args.port <= 65535:
                raise ConfigError(f"invalid --port {args.port}: must be 0..65535")
            config = config.model_copy(update={"port": args.port})
        setup_logging("scheduler", config.log_level)
        check_open_files_limit(SCHEDULER_DESCRIPTORS, "a stream per connected host, and some more")
        asyncio.run(_serve(config, args.ready_file))
    except DflyError as exc:
        print(f"dfly scheduler: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"dfly scheduler: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
