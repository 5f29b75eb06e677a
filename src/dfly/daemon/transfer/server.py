"""Parent side of the piece protocol: `PieceServer` serves cached pieces on port 4005.

Rules:
- One asyncio task per connection, built on a non-blocking socket from `loop.sock_accept` (no transport),
  so nothing is buffered behind our back: control frames go out with `loop.sock_sendall`, piece bytes
  with `os.sendfile` from the task file straight after their PIECE header.
- Per connection a reader task decodes REQUEST / CANCEL into a FIFO queue and a writer task owns the
  socket's sending side: pending HAVE / ERROR frames first, then one queued piece at a time (upload slot,
  then token bucket, then header + sendfile). A CANCEL drops a queued request, or the current one while
  it still waits for its slot or tokens; once its header is out a piece completes.
- HAVE frames come from `ServedTask.subscribe`; the callback may run on any thread and hops to the loop
  with `call_soon_threadsafe` (directly when already on it). A HAVE waits at most for the piece being
  sent at that moment.
- The digest sent is the stored one (`piece_digest`); bytes are never re-read to compute it.
- Each piece is sent from its own dup of the task's fd, taken before its header: a task removed
  mid-piece (a failed registry digest) closes only its own fd, whose number the kernel may hand out again.
- A task with a first-pass gate (this daemon is the swarm's source, core/first_pass.py) serves each piece
  to one child before any piece twice: a REQUEST for a piece given to another child is answered at once
  with ERROR not_available, and that child gets HAVE for it again when the claim is handed back or the
  gate releases; after the release one copy of a piece is sent at a time, and a child refused one hears
  HAVE again when that copy is done. A claimed piece not delivered (cancelled before its header,
  connection lost) is handed back.
- One address holds at most a quarter of the upload slots at once (`address_slots`), and at most
  `max_connections_per_address` connections: a host that asks and does not read cannot stop the rest.
- A connected child holds its task (`ServedTask.hold`: the storage GC leaves it alone); TCP keepalive
  (60 s idle, 3 probes 10 s apart) closes the connection of a child that vanished without a FIN.
- With a TLS context (`security.tls.pieces`) each accepted connection first completes an mTLS handshake
  (`tls_relay.serve_tls`) and is then served exactly like a plain one, through a socketpair.
- A bad client never crashes the server: protocol errors get ERROR bad_frame (unless we are in the middle
  of a frame) and the connection closes; everything is logged at debug level.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Protocol

from dfly.common.errors import ProtocolError, StorageError
from dfly.common.net import enable_keepalive, listen_socket
from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.connection import ChildConnection
from dfly.daemon.transfer.ratelimit import TokenBucket
from dfly.daemon.transfer.tls_relay import serve_tls

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024  # child connections at once (one per task a child downloads from here)
ADDRESS_SHARE_DIVISOR = 4  # one address (host) uploads to at most a quarter of the upload slots at once


class ServedTask(Protocol):
    """A task this daemon can upload; implemented by the daemon on top of storage."""

    task_id: str
    piece_length: int
    content_length: int

    @property
    def piece_count(self) -> int: ...

    def available_pieces(self) -> Iterable[int]: ...

    def piece_digest(self, number: int) -> int | None:
        """The recorded CRC-32 of an available piece; None = not available."""
        ...

    def read_fd(self) -> int:
        """An O_RDONLY fd of the task file, owned (and closed) by the task; a piece is sent from a dup of it,
        so a task removed mid-piece cannot close (or reuse) the fd under that piece's sendfile."""
        ...

    def subscribe(self, on_available: Callable[[int], None]) -> Callable[[], None]:
        """Call `on_available(n)` (from any thread) when piece n becomes available; returns unsubscribe."""
        ...

    @property
    def first_pass(self) -> FirstPassGate | None:
        """The source's first-pass gate while it applies; None = serve every piece to everyone."""
        ...

    def peer_has(self, peer_id: str, number: int) -> bool:
        """Whether `peer_id` is known to hold piece n (it is also a parent of this daemon and said so):
        a HAVE for it would be wasted on that child."""
        ...

    def hold(self) -> Callable[[], None]:
        """Keep the task (and its file) from the storage GC while a child is connected; returns release."""
        ...

    def report_corrupt(self, number: int) -> None:
        """A child got piece n (sent on its connection) failing its CRC-32: check the stored copy."""
        ...


class PieceProvider(Protocol):
    def lookup(self, task_id: str) -> ServedTask | None: ...


UploadCallback = Callable[[str, int], None]


class PieceServer:
    def __init__(
        self,
        provider: PieceProvider,
        peer_id: str,
        limiter: TokenBucket,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_address: int = 256,
        upload_slots: int = 200,
        max_queued_requests: int = 64,
        hello_timeout_s: float = 10.0,
        stall_timeout_s: float = 60.0,
        on_uploaded: UploadCallback | None = None,
        upload_threads: int = 4,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.provider = provider
        self.tls_context = tls_context
        self.peer_id = peer_id
        self.limiter = limiter
        self.max_connections = max_connections
        # one host (one address) cannot take every connection: it needs one per task it downloads
        self.max_connections_per_address = max_connections_per_address
        self._open_by_address: dict[str, int] = {}
        self.max_queued_requests = max_queued_requests
        self.hello_timeout_s = hello_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.on_uploaded = on_uploaded
        self.slots = asyncio.Semaphore(upload_slots) if upload_slots > 0 else None
        # One address's share of the slots: 200 connections from one host that each asked for a piece
        # and read nothing held every slot until the stall timeout, and no other child got a byte.
        self.slots_per_address = max(1, upload_slots // ADDRESS_SHARE_DIVISOR) if upload_slots > 0 else 0
        self._slots_by_address: dict[str, asyncio.Semaphore] = {}
        self.bytes_uploaded = 0
        self.connections_open = 0
        self.active_uploads = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.upload_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=upload_threads, thread_name_prefix="dfly-upload"
        )

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = kernel's choice); returns the bound port."""
        loop = asyncio.get_running_loop()
        sock = listen_socket(host, port)
        self._listener = sock
        self._accept_task = loop.create_task(self._accept_loop(sock), name="piece-server-accept")
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, tell connected children `shutdown`, close every connection."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.upload_threads.shutdown(wait=True)

    def count_upload(self, task_id: str, nbytes: int) -> None:
        self.bytes_uploaded += nbytes
        if self.on_uploaded is not None:
            self.on_uploaded(task_id, nbytes)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: back off briefly instead of spinning
                log.warning("piece server accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_keepalive(sock)  # a vanished child must not hold its task (and the GC) forever
            address = _address_of(addr)
            from_address = self._open_by_address.get(address, 0)
            if (
                self.connections_open >= self.max_connections
                or from_address >= self.max_connections_per_address
            ):
                log.debug("piece server busy, refusing %s", addr)
                with contextlib.suppress(OSError):
                    if self.tls_context is None:  # a TLS child could not read a plain frame
                        sock.send(p.encode_error("busy", "too many connections"))
                sock.close()
                continue
            serving = (
                self._serve(sock, addr)
                if self.tls_context is None
                else serve_tls(
                    sock,
                    self.tls_context,
                    self.hello_timeout_s,
                    functools.partial(self._serve, addr=addr),
                    flush_timeout_s=self.stall_timeout_s,
                )
            )
            self._open_by_address[address] = from_address + 1
            task = loop.create_task(serving, name=f"piece-conn-{addr}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._closed_from, address))

    def _closed_from(self, address: str, _task: asyncio.Task[None]) -> None:
        left = self._open_by_address.get(address, 1) - 1
        if left > 0:
            self._open_by_address[address] = left
        else:
            self._open_by_address.pop(address, None)
            self._slots_by_address.pop(address, None)  # its last connection held none any more

    def address_slots(self, address: str) -> contextlib.AbstractAsyncContextManager[object]:
        """The slots one address may hold at once (entered before the shared ones)."""
        if not self.slots_per_address:
            return contextlib.nullcontext()
        if (slots := self._slots_by_address.get(address)) is None:
            slots = self._slots_by_address[address] = asyncio.Semaphore(self.slots_per_address)
        return slots

    async def _serve(self, sock: socket.socket, addr: object) -> None:
        self.connections_open += 1
        conn = ChildConnection(self, sock, _address_of(addr))
        try:
            await conn.run()
        except asyncio.CancelledError:
            conn.send_now(p.encode_error("shutdown", "daemon is shutting down"))
            raise
        except ProtocolError as exc:
            log.debug("piece connection %s: protocol error: %s", addr, exc)
            conn.send_now(p.encode_error("bad_frame", str(exc)))
        except (OSError, TimeoutError, StorageError) as exc:
            log.debug("piece connection %s closed: %r", addr, exc)
        except Exception:
            log.debug("piece connection %s failed", addr, exc_info=True)
        finally:
            self.connections_open -= 1
            conn.closed = True
            sock.close()


def _address_of(addr: object) -> str:
    """The host part of an accepted connection's address: what the per-address limits count."""
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
