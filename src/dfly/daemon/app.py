"""Composition root of dfdaemon: builds storage, tasks, listeners and the scheduler link, then runs.

Start order: storage opened (crash recovery) and its tasks loaded → piece server, control, proxy,
health, metrics, local API bound → storage GC started (first pass after gc.interval_s) → host announced
to the scheduler → ready file written. Stop order is the reverse, ending with the storage's final group
commit and clean-shutdown marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import os
import random
import socket
import uuid
from pathlib import Path

import grpc

from dfly.api import daemon_pb2
from dfly.api import daemon_pb2_grpc as dpb_grpc
from dfly.api import scheduler_pb2 as pb
from dfly.common.grpc_health import GrpcHealth
from dfly.common.ids import host_id as make_host_id
from dfly.common.metrics_http import start_metrics_server
from dfly.common.net import host_port
from dfly.common.own_thread import in_own_thread
from dfly.common.ready_file import write_ready_file
from dfly.common.tls import add_port, piece_client_context, piece_server_context
from dfly.daemon.config import DaemonConfig, ListenerSection
from dfly.daemon.context import Counters, DaemonContext
from dfly.daemon.gc import StorageGC
from dfly.daemon.lifecycle import binding, check_storage_dir, stop_in_order
from dfly.daemon.local_api import LocalApiServer
from dfly.daemon.proxy.server import RegistryMirror
from dfly.daemon.scheduler_client import SchedulerClient, source_ip_toward
from dfly.daemon.scheduler_ring import SchedulerRing
from dfly.daemon.services import ControlService, TrustedSchedulers, start_health_server
from dfly.daemon.storage import Storage
from dfly.daemon.tasks import TaskManager
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.ratelimit import TokenBucket
from dfly.daemon.transfer.server import PieceServer

log = logging.getLogger(__name__)

RATE_SAMPLE_S = 1.0
ANNOUNCE_RETRY_S = 0.5
UNRESOLVABLE_CHECK_S = 5.0  # the no-such-host hint after a failed announce: its lookups, in all


class UploadRate:
    """EWMA of the upload byte rate, sampled once a second; reported on the host keepalive."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self.rate = 0.0
        self._last = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RATE_SAMPLE_S)  # a sampling period
            now_bytes = self._counters.upload_bytes
            self.rate = 0.7 * self.rate + 0.3 * (now_bytes - self._last) / RATE_SAMPLE_S
            self._last = now_bytes


async def load_cache(storage: Storage, tasks: TaskManager) -> None:
    """Open the storage (crash recovery) and load the tasks it held: the start-up work that grows with
    the cache (bench/cache_startup.py measures it)."""
    # It builds a long-lived graph of objects per cached task and no garbage cycles (none at 50,000
    # tasks): the collections that its allocations set off walked that graph again and again (1.0 of
    # 2.6 s at 50,000 tasks of 40 pieces), so the collector is off until the graph is frozen.
    enabled = gc.isenabled()
    gc.disable()
    try:
        tasks.load(await storage.open())  # the recovered list is dropped once loaded: no second copy
        # What start-up built (the cached tasks' state, imports) lives as long as the process: out of
        # the collector's sight, so a full collection does not walk it (237 ms at 50,000 cached tasks).
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


async def run(config: DaemonConfig, *, ready_file: Path | None, stop: asyncio.Event) -> None:
    check_storage_dir(config.storage.dir)
    storage = Storage(config.storage.dir, commit_interval_s=config.storage.commit_interval_s)
    seed = config.seed_peer.enable
    piece_on_ipv4 = ipaddress.ip_address(config.piece.ip).version == 4  # children must dial that family
    ip = config.host.advertise_ip or source_ip_toward(config.scheduler.addrs[0], ipv4_only=piece_on_ipv4)
    host = make_host_id(ip, config.host.hostname)
    boot_id = uuid.uuid4().hex
    counters = Counters()
    ctx = DaemonContext(
        config=config,
        host_id=host,
        hostname=config.host.hostname,
        ip=ip,
        seed=seed,
        storage=storage,
        scheduler=None,
        pool=BufferPool(config.download.buffer_bytes),
        counters=counters,
        rng=random.Random(),
        piece_tls=piece_client_context(config.security.tls),
    )
    tasks = TaskManager(ctx)
    await load_cache(storage, tasks)
    storage_gc = StorageGC(config.gc, storage, tasks, counters)
    storage_gc.loaded_from_mtimes()
    ctx.admit = storage_gc.admit
    storage.on_pieces_lost = tasks.pieces_lost
    limit = config.upload.rate_limit_bytes_per_s
    limiter = TokenBucket(limit, max(limit // 10, 4 << 20) if limit else 0)
    pieces = PieceServer(
        tasks,
        host,
        limiter,
        upload_slots=config.upload.slots,
        on_uploaded=lambda _task, n: counters.uploaded(n),
        tls_context=piece_server_context(config.security.tls),
    )
    # A leech (upload.disable_shared) opens no piece port and announces 0: never offered as a parent.
    leech = config.upload.disable_shared
    # Until the main block below takes them over, a listener that cannot bind closes what is already up.
    early = contextlib.AsyncExitStack()
    early.push_async_callback(storage.close)
    try:
        with binding("piece", _address(config.piece)):
            piece_port = 0 if leech else await pieces.start(config.piece.ip, config.piece.port)
        early.push_async_callback(pieces.close)

        control = grpc.aio.server()
        trusted = config.control.trusted_schedulers or [
            a.rpartition(":")[0].strip("[]") for a in config.scheduler.addrs
        ]
        service = ControlService(TrustedSchedulers(trusted), tasks.trigger)
        dpb_grpc.add_DfdaemonControlServicer_to_server(service, control)
        control_health = GrpcHealth(
            control, [daemon_pb2.DESCRIPTOR.services_by_name["DfdaemonControl"].full_name]
        )
        with binding("control", _address(config.control)):
            control_port = add_port(control, _address(config.control), config.security.tls)
        await control.start()
        await control_health.start()
        early.push_async_callback(control.stop, 1.0)
        with binding("health", _address(config.health)):
            why_not_ready = functools.partial(_not_ready, ctx, stop)
            health = await start_health_server(config.health.ip, config.health.port, why_not_ready)
        early.callback(health.close)
        health_port = health.sockets[0].getsockname()[1]
        with binding("metrics", _address(config.metrics)):
            metrics_server, metrics_thread = start_metrics_server(config.metrics.ip, config.metrics.port)
        early.callback(metrics_server.shutdown)
        metrics_port = metrics_server.server_port
        api = config.local_api
        local_api = LocalApiServer(tasks, api.socket, api.mode, api.group)
        with binding("local_api", str(api.socket)):
            await local_api.start()
        early.push_async_callback(local_api.close)
        proxy = config.proxy
        auth = (proxy.basic_auth_username, proxy.basic_auth_password) if proxy.basic_auth_username else None
        certs = None
        if proxy.enable and proxy.hijack_https.hosts:
            # cryptography: imported only when interception is configured
            from dfly.daemon.proxy.certs import HostCertificates, load_or_create_ca

            ca_cert, ca_key, ca_path = load_or_create_ca(
                proxy.hijack_https.cert, proxy.hijack_https.key, config.storage.dir
            )
            certs = HostCertificates(ca_cert, ca_key, config.storage.dir)
            log.info("intercepting HTTPS for %s; clients must trust %s", proxy.hijack_https.hosts, ca_path)
        mirror = RegistryMirror(
            tasks,
            proxy.registry_mirror,
            proxy.allowed_hosts,
            proxy.rules,
            auth,
            proxy.public_registries,
            proxy.hijack_https.hosts,
            certs,
            proxy.idle_timeout_s,
            tunnel_idle_timeout_s=proxy.tunnel_idle_timeout_s,
            max_connections=proxy.max_connections,
        )
        with binding("proxy", _address(config.proxy)):
            proxy_port = await mirror.start(proxy.ip, proxy.port) if proxy.enable else None
    except BaseException:
        await early.aclose()
        raise
    early.pop_all()  # from here the main block's `finally` closes them

    upload_rate = UploadRate(counters)

    def host_info() -> pb.HostInfo:
        return pb.HostInfo(
            host_id=host,
            hostname=config.host.hostname,
            ip=ip,
            piece_port=piece_port,
            control_port=control_port,
            seed=seed,
            boot_id=boot_id,
            idc=config.host.idc,
            location=config.host.location,
            upload_limit_bytes_per_s=limit,
            upload_slots=config.upload.slots,
        )

    scheduler = SchedulerRing(
        [
            SchedulerClient(
                addr,
                host_info=host_info,
                finished_tasks=tasks.finished_tasks,
                load=lambda: (upload_rate.rate, pieces.active_uploads),
                keepalive_interval_s=config.scheduler.keepalive_interval_s,
                tls=config.security.tls,
                holds_task=tasks.holds,
            )
            for addr in config.scheduler.addrs
        ]
    )
    ctx.scheduler = scheduler
    try:
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(upload_rate.run()), tg.create_task(storage_gc.run())]
            await _announce_until_done(scheduler, stop, scheduler_tls=config.security.tls.enabled)
            background.append(tg.create_task(scheduler.run_keepalive()))
            if ready_file is not None and not stop.is_set():
                write_ready_file(
                    ready_file,
                    {
                        "role": "seed" if seed else "peer",
                        "pid": os.getpid(),
                        "host_id": host,
                        "hostname": config.host.hostname,
                        "data_dir": str(config.storage.dir),
                        "socket": str(config.local_api.socket),
                        "ports": {
                            "control": control_port,
                            "proxy": proxy_port,
                            "metrics": metrics_port,
                            "health": health_port,
                            "piece": piece_port,
                        },
                    },
                )
            where = f"pieces on {host_port(config.piece.ip, piece_port)}"
            if leech:
                where = "no piece server: upload.disable_shared"
            if not stop.is_set():  # told to stop before any scheduler took the announce: never ready
                log.info("dfdaemon %s ready (seed=%s, %s)", host, seed, where)
            await stop.wait()
            log.info("dfdaemon %s stopping", host)
            for task in background:
                task.cancel()
    finally:

        def stamp_gc() -> None:
            with contextlib.suppress(OSError):
                storage_gc.stamp()

        await stop_in_order(
            ("the control port's health service", control_health.shutdown),
            ("the proxy", mirror.close),
            ("the local API", local_api.close),
            ("the control port", lambda: control.stop(1.0)),  # no seed trigger starts a download now
            ("the downloads", tasks.close),
            ("the storage GC's stamp", stamp_gc),
            ("the piece server", pieces.close),
            ("the health endpoint", health.close),
            ("the metrics endpoint", metrics_server.shutdown),
            ("the metrics thread", lambda: metrics_thread.join(timeout=2.0)),
            ("the leave from the schedulers", scheduler.leave),
            ("the scheduler connections", scheduler.close),
            ("the storage", storage.close),  # last: its clean-shutdown marker says all above ended
        )
        log.info("dfdaemon %s stopped", host)


def _address(section: ListenerSection) -> str:
    return host_port(section.ip, section.port)


async def _unresolvable(addrs: list[str], timeout_s: float = UNRESOLVABLE_CHECK_S) -> list[str]:
    """The scheduler host names that do not resolve (gRPC reports them only as DEADLINE_EXCEEDED), for a
    hint in the log: looked up together, at most `timeout_s` in all (a resolver that hangs gives no hint
    rather than holding the start-up, and a stop, for its own timeouts per name; a lookup given up on
    ends in its own daemon thread)."""
    hosts = [addr.rpartition(":")[0].strip("[]") for addr in addrs]

    async def fails(host: str) -> bool:
        try:  # in a daemon thread: one given up on holds no worker of the default executor
            await in_own_thread("scheduler-dns", socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return True
        return False

    try:
        async with asyncio.timeout(timeout_s):
            failed = await asyncio.gather(*(fails(host) for host in hosts))
    except TimeoutError:
        return []
    return [host for host, bad in zip(hosts, failed, strict=True) if bad]


def _not_ready(ctx: DaemonContext, stop: asyncio.Event) -> str | None:
    """Why the daemon does not serve the swarm yet (None: it does): no scheduler connected (before the
    first announce, or while every keepalive stream is down: downloads then read the origin), or it is
    stopping (a balancer should send no new work while in-flight requests end)."""
    if stop.is_set():
        return "stopping"
    ring = ctx.scheduler
    if ring is None:
        return "starting"
    if ring.clients and not any(client.connected.is_set() for client in ring.clients):
        return "no scheduler connected"
    return None


async def _announce_until_done(scheduler: SchedulerRing, stop: asyncio.Event, *, scheduler_tls: bool) -> None:
    """Ready means announced: retry until a scheduler answers or the daemon is told to stop (also while
    an announce is pending: it may wait for its whole deadline)."""
    while not stop.is_set():
        announce = asyncio.ensure_future(scheduler.announce_any())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((announce, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not announce.done():
                announce.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announce
        if announce.cancelled():
            return
        try:
            announce.result()
            return
        except grpc.aio.AioRpcError as exc:
            unresolved = await _unresolvable([client.addr for client in scheduler.clients])
            if unresolved:
                hint = f" ({', '.join(unresolved)}: no such host)"
            elif exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                # gRPC reports a failed TLS handshake so too; its reason is only in gRPC's own log lines
                mine = "on" if scheduler_tls else "off"
                hint = f" (not running or not reachable, or its security.tls differs: it is {mine} here)"
            else:
                hint = ""
            log.warning(
                "cannot announce to scheduler %s: %s%s; retrying", scheduler.addr, exc.code().name, hint
            )
        try:
            await asyncio.wait_for(stop.wait(), ANNOUNCE_RETRY_S)
        except TimeoutError:
            pass
