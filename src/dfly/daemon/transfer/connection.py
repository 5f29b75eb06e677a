"""One child's connection to the piece server (server.py holds the rules both follow): a reader task
decoding REQUEST / CANCEL into a FIFO queue, a writer task owning the socket's sending side (pending
HAVE / ERROR frames first, then one queued piece at a time: upload slot, token bucket, header +
sendfile), and the first-pass gate's claims for this child.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from dfly.common.errors import ProtocolError
from dfly.daemon.core.first_pass import FirstPassGate
from dfly.daemon.transfer import protocol as p
from dfly.daemon.transfer.sendfile import sendfile_range

if TYPE_CHECKING:
    from dfly.daemon.transfer.server import PieceServer, ServedTask

log = logging.getLogger(__name__)


class ChildConnection:
    """One child's connection to this parent's PieceServer."""

    def __init__(self, server: PieceServer, sock: socket.socket, address: str = "") -> None:
        self.server = server
        self.sock = sock
        self.address = address  # the child's host: its share of the upload slots (server.address_slots)
        self.loop = asyncio.get_running_loop()
        self.decoder = p.FrameDecoder("parent")
        self.task: ServedTask | None = None
        self.child_id = ""  # the child's peer id, from its HELLO
        self.queue: deque[int] = deque()
        self.current = -1  # piece popped from the queue, not yet on the wire
        self.current_cancelled = False
        self.current_cancel = asyncio.Event()  # set with current_cancelled: ends a wait for upload tokens
        self.out = bytearray()  # control frames waiting for the writer
        self.out_errors = 0  # ERROR answers in `out`: a child that asks without reading them is dropped
        self.wake = asyncio.Event()
        self.known = bytearray()  # pieces announced to the child
        self.sent = bytearray()  # pieces sent to the child (bits; sized on the first one)
        self.claimed: set[int] = set()  # pieces the first-pass gate gave this child, not yet delivered
        # refused by the gate, told again once it may be claimed: piece -> remover of the gate's listener
        self.waiting_free: dict[int, Callable[[], None]] = {}
        self.mid_frame = False
        self.closed = False

    def send_now(self, frame: bytes) -> None:
        """Best-effort, non-blocking final frame (ERROR before close); skipped in the middle of a frame."""
        if not self.mid_frame:
            with contextlib.suppress(OSError):
                self.sock.send(frame)

    async def _send(self, data: bytes) -> None:
        """Send all of `data`; a child that has not taken it all within stall_timeout_s is dropped.

        Almost every frame fits in the socket's buffer at once: that case is one `send` call, with no
        timer armed and cancelled around it (a timer per HAVE was ~9 % of a daemon's loop time).
        """
        self.mid_frame = True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            async with asyncio.timeout(self.server.stall_timeout_s):
                await self.loop.sock_sendall(self.sock, memoryview(data)[sent:])
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
        self.task, self.child_id = task, hello.peer_id
        release = task.hold()
        unsubscribe = task.subscribe(self._on_available)
        try:
            self.known = p.make_bitfield(task.piece_count, task.available_pieces())
            greeting = p.encode_hello(
                task.task_id, self.server.peer_id, task.piece_length, task.content_length
            )
            await self._send(greeting + p.encode_bitfield(self.known))
            if self._handle(events[1:]):  # not when ERROR or EOF came with the HELLO
                await self._run_loops()
        finally:
            self.closed = True
            unsubscribe()
            release()
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
        """Apply the child's frames as they arrive, until it closes or breaks the protocol.

        One reader callback for the connection's life: `sock_recv_into` per read added and removed the
        fd's reader each time.
        """
        ended: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_reader(fd, self._readable, ended)
        try:
            await ended
        finally:
            self.loop.remove_reader(fd)

    def _readable(self, ended: asyncio.Future[None]) -> None:
        if ended.done():
            return
        try:  # one read per call: the loop calls again while more is waiting
            try:
                n = self.sock.recv_into(self.decoder.get_buffer())
            except (BlockingIOError, InterruptedError):
                return
            if n == 0:
                self.decoder.receive_data(b"")
            else:
                self.decoder.buffer_updated(n)
            events: list[p.Event] = []
            while not isinstance(event := self.decoder.next_event(), p.NeedData):
                events.append(event)
                if isinstance(event, p.Closed):
                    break
            if not self._handle(events):
                ended.set_result(None)
        except Exception as exc:  # ProtocolError, ConnectionError: the connection's end, re-raised by run
            ended.set_exception(exc)

    def _handle(self, events: list[p.Event]) -> bool:
        """Apply REQUEST / CANCEL; False when the child is gone."""
        for event in events:
            if isinstance(event, p.Request):
                limit = self.server.max_queued_requests
                if len(self.queue) >= limit:
                    raise ProtocolError(f"more than {limit} queued requests")
                if self.out_errors >= limit:  # refused requests repeated while our answers go unread
                    raise ProtocolError(f"more than {limit} refused requests not yet read")
                if self._refused_by_gate(event.number):
                    continue
                self.queue.append(event.number)
                self.wake.set()
            elif isinstance(event, p.Cancel):
                if event.number == self.current:
                    self.current_cancelled = True
                    self.current_cancel.set()
                with contextlib.suppress(ValueError):
                    self.queue.remove(event.number)
                    self._unclaim(event.number)
            elif isinstance(event, p.Error):
                log.debug("child sent ERROR %s: %s", event.code, event.message)
                reported = event.piece if event.code == "corrupt_piece" else None
                if reported is not None and p.has_bit(self.sent, reported):  # only a piece it was sent
                    assert self.task is not None
                    self.task.report_corrupt(reported)
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
        if gate.released:  # one copy at a time: claimed when its turn to be sent comes (_serve_piece)
            if not gate.taken(number):
                return False
        elif gate.claim(number):
            self.claimed.add(number)
            return False
        self._refuse_taken(number, gate)
        return True

    def _refuse_taken(self, number: int, gate: FirstPassGate) -> None:
        """Refuse a piece another child has (or is being sent); HAVE again once it is free."""
        if 0 <= number < len(self.known) * 8:
            self.known[number >> 3] &= ~(0x80 >> (number & 7)) & 0xFF
        self._refuse(number, "is with another child")
        # told again (HAVE) when its claim comes back, at the release, or when the copy being sent is done
        if number not in self.waiting_free:  # once per piece, however often the child asks
            self.waiting_free[number] = gate.on_free(number, functools.partial(self._freed, number))

    def _refuse(self, number: int, why: str) -> None:
        self.out += p.encode_error("not_available", f"piece {number} {why}", piece=number)
        self.out_errors += 1
        self.wake.set()

    def _take_out(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        self.out_errors = 0
        return data

    def _freed(self, number: int) -> None:
        self.waiting_free.pop(number, None)
        self._push_have(number)

    def _unclaim(self, number: int) -> None:
        if number in self.claimed:
            self.claimed.discard(number)
            gate = self.task.first_pass if self.task is not None else None
            if gate is not None:
                gate.unclaim(number)

    def _hand_back_claims(self) -> None:
        removers, self.waiting_free = list(self.waiting_free.values()), {}
        for remove in removers:
            remove()
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
        if self.task is not None and self.task.peer_has(self.child_id, number):
            return  # the child announced it to us as our parent: it would never ask (not marked known)
        p.set_bit(self.known, len(self.known) * 8, number)
        self.out += p.encode_have(number)
        self.wake.set()

    async def _writer(self) -> None:
        while True:
            if self.queue:
                await self._serve_piece(self.queue.popleft())
            elif self.out:
                await self._send(self._take_out())
            else:
                self.wake.clear()
                await self.wake.wait()

    def _mark_sent(self, number: int, piece_count: int) -> None:
        if not self.sent:
            self.sent = p.make_bitfield(piece_count)
        p.set_bit(self.sent, piece_count, number)

    async def _serve_piece(self, number: int) -> None:
        task = self.task
        assert task is not None
        digest = task.piece_digest(number)
        if digest is None:
            self._unclaim(number)
            self._refuse(number, "is not available")
            return
        gate = task.first_pass
        if gate is not None and gate.released and number not in self.claimed:
            if not gate.claim(number):  # another child's copy of it is on the wire
                self._refuse_taken(number, gate)
                return
            self.claimed.add(number)
        offset, length = p.piece_span(number, task.piece_length, task.content_length)
        server = self.server
        self.current, self.current_cancelled = number, False
        self.current_cancel.clear()
        async with (
            server.address_slots(self.address),
            server.slots if server.slots is not None else contextlib.nullcontext(),
        ):
            server.active_uploads += 1
            try:
                # A CANCEL while this waited for its slot or its tokens: nothing is charged (or the
                # tokens go back), so the other children's share of the upload limit is not spent on it.
                sendable = await server.limiter.acquire(length, unless=self.current_cancel)
                self.current = -1
                if not sendable or self.current_cancelled:
                    self._unclaim(number)
                    return
                # Read again: while this waited the piece may have been dropped (object changed, bad
                # bytes, failed sync) or stored anew; its old digest would not match what is sent.
                digest = task.piece_digest(number)
                if digest is None:
                    server.limiter.refund(length)
                    self._unclaim(number)
                    self._refuse(number, "is not available")
                    return
                # our own fd for this piece: the task's cached fd is closed (and its number may be reused)
                # if the task is removed meanwhile, while a sendfile may still be reading it
                fd = os.dup(task.read_fd())
                try:
                    header = self._take_out() + p.encode_piece_header(number, offset, length, digest)
                    await self._send(header)
                    self._mark_sent(number, task.piece_count)  # a report may come before sendfile returns
                    self.mid_frame = True
                    await sendfile_range(
                        self.loop,
                        self.sock,
                        fd,
                        offset,
                        length,
                        server.stall_timeout_s,
                        server.upload_threads,
                    )
                finally:
                    os.close(fd)  # sendfile_range has waited for its thread, also when cancelled
                self.mid_frame = False
                if number in self.claimed:  # delivered: during the first pass it stays given out
                    self.claimed.discard(number)
                    if task.first_pass is not None:
                        task.first_pass.delivered(number)
            finally:
                server.active_uploads -= 1
        server.count_upload(task.task_id, length)
