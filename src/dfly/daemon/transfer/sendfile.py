"""Sending a piece's bytes from the task file with `os.sendfile`, in an upload thread.

Rules: never on the event loop (the kernel copy of a large piece takes milliseconds: a seed's loop spent
most of a 1 GiB upload inside sendfile); the socket stays non-blocking and the thread waits with poll();
a cancelled caller shuts the socket down so the thread fails at once, and waits for the thread, so the
socket is never closed under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import select
import socket

from dfly.common.errors import StorageError


def _sendfile_blocking(sock_fd: int, fd: int, offset: int, count: int, stall_s: float) -> None:
    """os.sendfile on a non-blocking socket, waiting with poll(); runs in an upload thread."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while count > 0:
        try:
            sent = os.sendfile(sock_fd, fd, offset, count)
        except BlockingIOError:
            if not poller.poll(stall_s * 1000):
                raise TimeoutError(f"child took no data for {stall_s:g} s") from None
            continue
        if sent == 0:
            raise StorageError(f"task file ends before offset {offset} + {count}")
        offset += sent
        count -= sent


async def sendfile_range(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    stall_s: float,
    executor: concurrent.futures.Executor | None = None,
) -> None:
    """Send `count` bytes of `fd` from `offset` with os.sendfile, off the event loop.

    The kernel copy of a large piece takes milliseconds; done on the loop it delayed everything else
    the daemon does (measured: a seed's loop spent most of a 1 GiB upload inside sendfile, stalling its
    own back-to-source). If the caller is cancelled, the socket is shut down so the thread's sendfile
    fails at once, and the thread is waited for: the socket is never closed under it.
    """
    future = loop.run_in_executor(executor, _sendfile_blocking, sock.fileno(), fd, offset, count, stall_s)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # the thread's error (EPIPE after the shutdown) is expected: retrieve it
        raise
