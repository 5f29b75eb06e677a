"""The daemon's link to its scheduler: host announce, the keepalive stream, AnnouncePeer streams.

Rules:
- The host is announced before the daemon reports ready; on every reconnect it is announced again
  with the tasks it holds completely, so the scheduler offers it as a parent again.
- The keepalive stream sends the observed upload rate and slots in use at least every
  `keepalive_interval_s`; when it breaks, the client reconnects with capped back-off. HTTP/2 pings
  every 10 s, each answered within 5 s, tell a hung scheduler from a quiet one within ~15 s.
- One client per scheduler; `scheduler_ring.py` spreads tasks over several and keeps them informed.
- A DeleteTask this scheduler could not take (not connected, timed out, unavailable) is remembered and
  sent again after the next announce and on each keepalive tick until it is taken, unless the host holds
  the task again by then (`holds_task`: the announce speaks for it). At most MAX_UNDELIVERED are kept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from typing import Any

import grpc

from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc as pb_grpc
from dfly.common.tls import TlsSection, aio_channel

log = logging.getLogger(__name__)

HostInfoSource = Callable[[], pb.HostInfo]
FinishedTasksSource = Callable[[Collection[str] | None], Iterable[pb.FinishedTask]]  # only these, or all
LoadSource = Callable[[], tuple[float, int]]  # (upload bytes/s EWMA, upload slots in use)
# A seed with terabytes of small layers holds ~100,000 tasks: tens of MiB of piece digests, over a
# scheduler's max_message_bytes in one message and seconds of its loop in one call.
ANNOUNCE_CHUNK_BYTES = 1 << 20
MAX_UNDELIVERED = 4096  # DeleteTasks kept for a scheduler that cannot take them; the oldest go first
# answers that say the scheduler will never take this DeleteTask: not sent again
_FINAL_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)


def announce_chunks(finished: Iterable[pb.FinishedTask]) -> Iterator[list[pb.FinishedTask]]:
    """The finished tasks in runs of at most ANNOUNCE_CHUNK_BYTES serialized (one task larger than that
    goes alone); one empty run when there are none, so the host itself is announced. Taken from
    `finished` only as each run is built: the caller's awaits between runs let the loop go on."""
    chunk: list[pb.FinishedTask] = []
    size = 0
    sent = False
    for task in finished:
        task_bytes = task.ByteSize() + 8  # the field's tag and length
        if chunk and size + task_bytes > ANNOUNCE_CHUNK_BYTES:
            yield chunk
            sent = True
            chunk, size = [], 0
        chunk.append(task)
        size += task_bytes
    if chunk or not sent:
        yield chunk


# Documentation addresses (RFC 5737, RFC 3849): connecting a UDP socket to one only looks up the route
ROUTE_PROBES: tuple[tuple[int, tuple[Any, ...]], ...] = (
    (socket.AF_INET, ("192.0.2.1", 9)),
    (socket.AF_INET6, ("2001:db8::1", 9)),
)


def source_ip_toward(addr: str, *, ipv4_only: bool = False) -> str:
    """The local address the kernel picks to reach `addr` (no packet is sent), over the address families
    its name resolves to, IPv4 first (only IPv4 with `ipv4_only`: a piece server listening on an IPv4
    address cannot be dialled at an IPv6 one). When it resolves to nothing reachable now (a scheduler
    whose DNS name is not yet published when the daemon starts), the address toward the default route,
    said in the log; the loopback address only on a host with no route at all. The result becomes the
    host's id, so a silent 127.0.0.1 had children of other hosts dial themselves."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except (OSError, ValueError):  # socket.gaierror included
        found = []
    # IPv4 first, as a name was dialled before: the piece server's default address (0.0.0.0) is IPv4
    # only, and a name with A and AAAA records (or `localhost`) must not make children dial IPv6
    families = (socket.AF_INET,) if ipv4_only else (socket.AF_INET, socket.AF_INET6)
    for family, _, _, _, sockaddr in sorted(found, key=lambda info: info[0] != socket.AF_INET):
        if family in families and (ip := _source_ip(family, sockaddr)):
            return ip
    for probe_family, probe in ROUTE_PROBES:
        if probe_family not in families:
            continue
        if (ip := _source_ip(probe_family, probe)) and not ipaddress.ip_address(ip).is_loopback:
            log.warning(
                "no %sroute to scheduler %s now; advertising %s, this host's address toward its default "
                "route (set host.advertise_ip to choose)", "IPv4 " if ipv4_only else "", addr, ip,
            )  # fmt: skip
            return ip
    log.warning("no route to scheduler %s nor any default route; advertising 127.0.0.1", addr)
    return "127.0.0.1"


def _source_ip(family: int, sockaddr: tuple[Any, ...]) -> str | None:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(sockaddr)
            return str(sock.getsockname()[0])
    except OSError:
        return None


class SchedulerClient:
    def __init__(
        self,
        addr: str,
        *,
        host_info: HostInfoSource,
        finished_tasks: FinishedTasksSource,
        load: LoadSource,
        keepalive_interval_s: float,
        tls: TlsSection | None = None,
        holds_task: Callable[[str], bool] = lambda task_id: False,
    ) -> None:
        self.addr = addr
        self._host_info = host_info
        self._finished_tasks = finished_tasks
        self._load = load
        self._holds_task = holds_task
        self.undelivered: dict[str, None] = {}  # task ids of DeleteTasks not taken yet, oldest first
        self._flushing: asyncio.Task[None] | None = None
        self._interval_s = keepalive_interval_s
        self._channel = aio_channel(
            addr,
            tls or TlsSection(),
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                # gRPC core waits for a ping's ack for this long (default 60 s) whatever the keepalive
                # timeout: a hung scheduler (SIGSTOP, a link that drops packets) was noticed after 70 s,
                # and every new download waited out schedule_timeout_s meanwhile; now after 15 s. Acks
                # come from gRPC core, not the scheduler's event loop: a grpc.aio server whose loop was
                # blocked for 12 s kept a client with 2 s pings connected.
                ("grpc.http2.ping_timeout_ms", 5_000),
                # gRPC's own reconnect backoff (1 s growing to 120 s by default) would keep a restarted
                # scheduler unused for minutes: retry from 0.2 s, at most every 5 s.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 5_000),
            ],
        )
        self.stub = pb_grpc.SchedulerStub(self._channel)
        self.connected = asyncio.Event()
        self.on_connected: Callable[[], None] | None = None  # the ring's hooks
        self.on_disconnected: Callable[[], None] | None = None

    async def announce(self, timeout_s: float = 10.0, only: Collection[str] | None = None) -> None:
        """AnnounceHost: this host and the tasks it holds complete (all, or `only` these), in as many
        calls as it takes to keep each under ANNOUNCE_CHUNK_BYTES (a scheduler adds what each lists)."""
        host = self._host_info()
        for chunk in announce_chunks(self._finished_tasks(only)):
            request = pb.AnnounceHostRequest(host=host, finished_tasks=chunk)
            await self.stub.AnnounceHost(request, timeout=timeout_s, wait_for_ready=True)
        self.connected.set()
        if self.on_connected is not None:
            self.on_connected()
        self._flush_soon()

    async def _keepalive_messages(self) -> AsyncIterator[pb.HostKeepAliveRequest]:
        info = self._host_info()
        while True:
            rate, slots = self._load()
            yield pb.HostKeepAliveRequest(
                host_id=info.host_id,
                boot_id=info.boot_id,
                upload_rate_bytes_per_s=rate,
                upload_slots_in_use=slots,
            )
            self._flush_soon()
            await asyncio.sleep(self._interval_s)  # a period, not a wait for an event

    async def run_keepalive(self) -> None:
        """Runs until cancelled: keepalive stream, and announce again after any break."""
        backoff_s = 0.2
        broken = False  # the stream broke before: say when it is back (operators alert on the break)
        while True:
            try:
                if not self.connected.is_set():
                    await self.announce()
                    if broken:
                        log.info("scheduler %s announced to again; keepalive resumed", self.addr)
                        broken = False
                backoff_s = 0.2
                await self.stub.HostKeepAlive(self._keepalive_messages())
            except grpc.aio.AioRpcError as exc:
                log.warning("scheduler %s keepalive broke: %s", self.addr, exc.code().name)
                broken = True
            if self.connected.is_set():
                self.connected.clear()
                if self.on_disconnected is not None:
                    self.on_disconnected()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    def announce_peer(
        self, wait_for_ready: bool = True
    ) -> grpc.aio.StreamStreamCall[pb.AnnouncePeerRequest, pb.AnnouncePeerResponse]:
        # wait_for_ready: a channel between reconnect attempts waits instead of failing the stream at
        # once (the caller bounds how long its first write may take); without it a channel that is down
        # fails the stream at once.
        return self.stub.AnnouncePeer(wait_for_ready=wait_for_ready)  # type: ignore[call-arg]  # aio: write() API

    async def leave(self) -> None:
        try:
            await self.stub.LeaveHost(pb.LeaveHostRequest(host_id=self._host_info().host_id), timeout=2.0)
        except grpc.aio.AioRpcError:
            pass

    async def delete_task(self, task_id: str) -> None:
        """Tell this scheduler the host no longer holds `task_id`; if it cannot take it now, it is told
        later (module rules)."""
        if not self.connected.is_set():
            self._remember(task_id, "not connected")
            return
        request = pb.DeleteTaskRequest(host_id=self._host_info().host_id, task_id=task_id)
        try:
            await self.stub.DeleteTask(request, timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FINAL_CODES:
                log.warning(
                    "scheduler %s refused DeleteTask of %s: %s", self.addr, task_id[:12], exc.code().name
                )
                self.undelivered.pop(task_id, None)
            else:
                self._remember(task_id, exc.code().name)
        else:
            self.undelivered.pop(task_id, None)

    def _remember(self, task_id: str, why: str) -> None:
        if task_id not in self.undelivered:
            log.info("scheduler %s not told yet that task %s is gone here (%s): it is told once it answers",
                     self.addr, task_id[:12], why)  # fmt: skip
        self.undelivered.pop(task_id, None)
        self.undelivered[task_id] = None
        while len(self.undelivered) > MAX_UNDELIVERED:
            del self.undelivered[next(iter(self.undelivered))]

    def _flush_soon(self) -> None:
        """Send the remembered DeleteTasks again, in one background task at a time."""
        if self.undelivered and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
            self._flushing.add_done_callback(_log_flush_failure)

    async def _flush(self) -> None:
        for task_id in list(self.undelivered):
            if self._holds_task(task_id):  # downloaded again: the announce reports what the host holds
                self.undelivered.pop(task_id, None)
            elif self.connected.is_set():
                await self.delete_task(task_id)

    async def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self._channel.close(None)


def _log_flush_failure(flush: asyncio.Task[None]) -> None:
    """An unexpected error of a background resend is logged when it happens (the next one replaces it)."""
    if not flush.cancelled() and (error := flush.exception()) is not None:
        log.error("resending DeleteTask failed", exc_info=error)
