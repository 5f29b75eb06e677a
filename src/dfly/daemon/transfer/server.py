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
- A task with a first-pass gate (this daemon is the swarm's source, core/first_pass.py) serves each piece
  to one child before any piece twice: a REQUEST for a piece given to another child is answered at once
  with ERROR not_available, and that child gets HAVE for it again when the gate releases; after the
  release one copy of a piece is sent at a time, and a child refused one hears HAVE again when that copy
  is done. A claimed piece not delivered (cancelled before its header, connection lost) is handed back.
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
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from dfly.common.errors import ProtocolError, StorageError
from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.ratelimit import TokenBucket
from dfly.daemon.transfer.sendfile import sendfile_range
from dfly.daemon.transfer.tls_relay import serve_tls

log = logging.getLogger(__name__)


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
        """An O_RDONLY fd of the task file, owned (and closed) by the task."""
        ...

    def subscribe(self, on_available: Callable[[int], None]) -> Callable[[], None]:
        """Call `on_available(n)` (from any thread) when piece n becomes available; returns unsubscribe."""
        ...

    @property
    def first_pass(self) -> FirstPassGate | None:
        """The source's first-pass gate while it applies; None = serve every piece to everyone."""
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
        max_connections: int = 1024,
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
        self.max_queued_requests = max_queued_requests
        self.hello_timeout_s = hello_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.on_uploaded = on_uploaded
        self.slots = asyncio.Semaphore(upload_slots) if upload_slots > 0 else None
        self.bytes_uploaded = 0
        self.bytes_uploaded_by_task: dict[str, int] = {}
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
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.create_server(addr[:2], family=family, backlog=1024)
        sock.setblocking(False)
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
        self.bytes_uploaded_by_task[task_id] = self.bytes_uploaded_by_task.get(task_id, 0) + nbytes
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
            if self.connections_open >= self.max_connections:
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
            task = loop.create_task(serving, name=f"piece-conn-{addr}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, addr: object) -> None:
        self.connections_open += 1
        conn = _Connection(self, sock)
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


class _Connection:
    """One child connection (internal to PieceServer)."""

    def __init__(self, server: PieceServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.decoder = p.FrameDecoder("parent")
        self.task: ServedTask | None = None
        self.queue: deque[int] = deque()
        self.current = -1  # piece popped from the queue, not yet on the wire
        self.current_cancelled = False
        self.out = bytearray()  # control frames waiting for the writer
        self.wake = asyncio.Event()
        self.known = bytearray()  # pieces announced to the child
        self.claimed: set[int] = set()  # pieces the first-pass gate gave this child, not yet delivered
        self.refused: set[int] = set()  # pieces the gate refused this child: announced again at release
        self.stop_waiting_release: Callable[[], None] | None = None
        self.mid_frame = False
        self.closed = False

    def send_now(self, frame: bytes) -> None:
        """Best-effort, non-blocking final frame (ERROR before close); skipped in the middle of a frame."""
        if not self.mid_frame:
            with contextlib.suppress(OSError):
                self.sock.send(frame)

    async def _send(self, data: bytes) -> None:
        self.mid_frame = True
        async with asyncio.timeout(self.server.stall_timeout_s):
            await self.loop.sock_sendall(self.sock, data)
        self.mid_frame = False

    async def _recv_events(self) -> list[p.Event]:
        """At least one event (Closed on EOF)."""
        events: list[p.Event] = []
        while not events:
            n = await self.loop.sock_recv_into(self.sock, self.decoder.get_buffer())
            if n == 0:
                self.decoder.receive_data(b"")
            else:
                self.decoder.buffer_updated(n)
            while not isinstance(event := self.decoder.next_event(), p.NeedData):
                events.append(event)
                if isinstance(event, p.Closed):
                    break
        return events

    async def run(self) -> None:
        async with asyncio.timeout(self.server.hello_timeout_s):
            events = await self._recv_events()
        hello = events[0]
        if not isinstance(hello, p.Hello):  # ERROR or EOF instead of HELLO
            log.debug("piece connection ended before HELLO: %r", hello)
            return
        task = self.server.provider.lookup(hello.task_id)
        if task is None:
            await self._send(p.encode_error("unknown_task", f"no task {hello.task_id}"))
            return
        if (task.piece_length, task.content_length) != (hello.piece_length, hello.content_length):
            await self._send(
                p.encode_error(
                    "layout_mismatch",
                    f"task has piece_length={task.piece_length} content_length={task.content_length}",
                )
            )
            return
        self.task = task
        unsubscribe = task.subscribe(self._on_available)
        try:
            self.known = p.make_bitfield(task.piece_count, task.available_pieces())
            greeting = p.encode_hello(
                task.task_id, self.server.peer_id, task.piece_length, task.content_length
            )
            await self._send(greeting + p.encode_bitfield(self.known))
            self._handle(events[1:])
            await self._run_loops()
        finally:
            self.closed = True
            unsubscribe()
            self._hand_back_claims()

    async def _run_loops(self) -> None:
        reader = self.loop.create_task(self._reader())
        writer = self.loop.create_task(self._writer())
        try:
            done, _ = await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        for finished in done:
            finished.result()  # re-raise the reason the connection ends

    async def _reader(self) -> None:
        while self._handle(await self._recv_events()):
            pass

    def _handle(self, events: list[p.Event]) -> bool:
        """Apply REQUEST / CANCEL; False when the child is gone."""
        for event in events:
            if isinstance(event, p.Request):
                if len(self.queue) >= self.server.max_queued_requests:
                    raise ProtocolError(f"more than {self.server.max_queued_requests} queued requests")
                if self._refused_by_gate(event.number):
                    continue
                self.queue.append(event.number)
                self.wake.set()
            elif isinstance(event, p.Cancel):
                if event.number == self.current:
                    self.current_cancelled = True
                with contextlib.suppress(ValueError):
                    self.queue.remove(event.number)
                    self._unclaim(event.number)
            elif isinstance(event, p.Error):
                log.debug("child sent ERROR %s: %s", event.code, event.message)
                return False
            elif isinstance(event, p.Closed):
                return False
        return True

    def _refused_by_gate(self, number: int) -> bool:
        """Apply the first-pass gate to a REQUEST; True = refused (ERROR not_available queued)."""
        task = self.task
        gate = task.first_pass if task is not None else None
        if gate is None or task is None or task.piece_digest(number) is None:
            return False
        if gate.claim(number):
            self.claimed.add(number)
            return False
        if 0 <= number < len(self.known) * 8:
            self.known[number >> 3] &= ~(0x80 >> (number & 7)) & 0xFF
        if gate.released:  # a copy is being sent to another child: told again once it is done
            gate.on_free(number, functools.partial(self._push_have, number))
        else:
            self.refused.add(number)
            if self.stop_waiting_release is None:
                self.stop_waiting_release = gate.on_release(self._announce_refused)
        self.out += p.encode_error("not_available", f"piece {number} is with another child", piece=number)
        self.wake.set()
        return True

    def _announce_refused(self) -> None:
        refused, self.refused = self.refused, set()
        for number in sorted(refused):
            self._push_have(number)

    def _unclaim(self, number: int) -> None:
        if number in self.claimed:
            self.claimed.discard(number)
            gate = self.task.first_pass if self.task is not None else None
            if gate is not None:
                gate.unclaim(number)

    def _hand_back_claims(self) -> None:
        if self.stop_waiting_release is not None:
            self.stop_waiting_release()
        for number in list(self.claimed):
            self._unclaim(number)

    def _on_available(self, number: int) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:  # another thread, without a loop
            on_loop = False
        if on_loop:  # the usual case (pieces are recorded on the loop): no self-pipe write per child
            self._push_have(number)
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            self.loop.call_soon_threadsafe(self._push_have, number)

    def _push_have(self, number: int) -> None:
        if self.closed or p.has_bit(self.known, number) or not 0 <= number < len(self.known) * 8:
            return
        p.set_bit(self.known, len(self.known) * 8, number)
        self.out += p.encode_have(number)
        self.wake.set()

    async def _writer(self) -> None:
        while True:
            if self.queue:
                await self._serve_piece(self.queue.popleft())
            elif self.out:
                data = bytes(self.out)
                self.out.clear()
                await self._send(data)
            else:
                self.wake.clear()
                await self.wake.wait()

    async def _serve_piece(self, number: int) -> None:
        task = self.task
        assert task is not None
        digest = task.piece_digest(number)
        if digest is None:
            self._unclaim(number)
            self.out += p.encode_error("not_available", f"piece {number} is not available", piece=number)
            return
        offset, length = p.piece_span(number, task.piece_length, task.content_length)
        server = self.server
        self.current, self.current_cancelled = number, False
        async with server.slots if server.slots is not None else contextlib.nullcontext():
            server.active_uploads += 1
            try:
                await server.limiter.acquire(length)
                self.current = -1
                if self.current_cancelled:
                    self._unclaim(number)
                    return
                header = bytes(self.out) + p.encode_piece_header(number, offset, length, digest)
                self.out.clear()
                await self._send(header)
                self.mid_frame = True
                await sendfile_range(
                    self.loop,
                    self.sock,
                    task.read_fd(),
                    offset,
                    length,
                    server.stall_timeout_s,
                    server.upload_threads,
                )
                self.mid_frame = False
                if number in self.claimed:  # delivered: during the first pass it stays given out
                    self.claimed.discard(number)
                    if task.first_pass is not None:
                        task.first_pass.delivered(number)
            finally:
                server.active_uploads -= 1
        server.count_upload(task.task_id, length)
