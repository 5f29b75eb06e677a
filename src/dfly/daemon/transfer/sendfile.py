"""Sending a piece's bytes from the task file with `os.sendfile`.

Rules: a range larger than INLINE_MAX is copied by an upload thread (the kernel copy of a large piece
takes milliseconds: a seed's loop spent most of a 1 GiB upload inside sendfile); a smaller one is sent
from the event loop (a thread hand-off per small piece cost more CPU than the copy: submit, wake-up and
the loop's self-pipe). The socket stays non-blocking, and a thread only copies while the socket takes
data: when it is full the thread is given back and the event loop waits for writability (a thread
waiting on a slow child's socket kept it from every other child: four slow children stopped a daemon's
uploads of large pieces). A cancelled caller shuts the socket down (the frame on the wire cannot be
finished) and waits for a running thread, so the socket is never closed under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket

from dfly.common.errors import StorageError

INLINE_MAX = 1024 * 1024  # ranges up to this are sent from the event loop


def _sendfile_until_full(sock_fd: int, fd: int, offset: int, count: int) -> int:
    """os.sendfile on a non-blocking socket until done or full; the bytes sent. Runs in an upload thread."""
    done = 0
    while done < count:
        try:
            sent = os.sendfile(sock_fd, fd, offset + done, count - done)
        except BlockingIOError:
            return done
        if sent == 0:
            raise StorageError(f"task file ends before offset {offset + done} + {count - done}")
        done += sent
    return done


async def sendfile_range(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    stall_s: float,
    executor: concurrent.futures.Executor | None = None,
) -> None:
    """Send `count` bytes of `fd` from `offset` with os.sendfile; a range over INLINE_MAX off the loop.

    The kernel copy of a large piece takes milliseconds; done on the loop it delayed everything else
    the daemon does (measured: a seed's loop spent most of a 1 GiB upload inside sendfile, stalling its
    own back-to-source). If the caller is cancelled, the socket is shut down (so a thread's sendfile
    fails at once) and the thread is waited for: the socket is never closed under it.
    """
    try:
        if count <= INLINE_MAX:
            await _sendfile_on_loop(loop, sock, fd, offset, count, stall_s)
        else:
            await _sendfile_in_threads(loop, sock, fd, offset, count, stall_s, executor)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise


async def _sendfile_in_threads(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    stall_s: float,
    executor: concurrent.futures.Executor | None,
) -> None:
    """Copies in an upload thread while the socket takes data; the loop waits while it is full."""
    sock_fd = sock.fileno()
    while count > 0:
        future = loop.run_in_executor(executor, _sendfile_until_full, sock_fd, fd, offset, count)
        try:
            sent = await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the thread's sendfile fails at once
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # the thread's error (EPIPE after the shutdown) is expected: retrieve it
            raise
        offset += sent
        count -= sent
        if count > 0:
            await _writable(loop, sock_fd, stall_s)


async def _sendfile_on_loop(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, fd: int, offset: int, count: int, stall_s: float
) -> None:
    """os.sendfile on the non-blocking socket from the loop, awaiting writability when it is full."""
    sock_fd = sock.fileno()
    while count > 0:
        try:
            sent = os.sendfile(sock_fd, fd, offset, count)
        except BlockingIOError:
            await _writable(loop, sock_fd, stall_s)
            continue
        if sent == 0:
            raise StorageError(f"task file ends before offset {offset} + {count}")
        offset += sent
        count -= sent


async def _writable(loop: asyncio.AbstractEventLoop, sock_fd: int, stall_s: float) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock_fd, _resolve, ready)
    try:
        async with asyncio.timeout(stall_s):
            await ready
    except TimeoutError:
        raise TimeoutError(f"child took no data for {stall_s:g} s") from None
    finally:
        loop.remove_writer(sock_fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
