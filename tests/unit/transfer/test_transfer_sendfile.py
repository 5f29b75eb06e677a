"""sendfile_range: both paths (on the loop up to INLINE_MAX, an upload thread above) deliver the exact
bytes, give up after the stall timeout, and shut the socket down when the caller is cancelled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dfly.daemon.transfer.sendfile import INLINE_MAX, sendfile_range

SMALL_SNDBUF = 65536  # so a reader that stops reading fills the sender's socket quickly
MakeTaskFile = Callable[[int], tuple[int, bytes]]


@pytest.fixture
def task_file(tmp_path: Path) -> Iterator[MakeTaskFile]:
    """make(size) -> (O_RDONLY fd, bytes) of a random file; the fds are closed after the test."""
    fds: list[int] = []

    def make(size: int) -> tuple[int, bytes]:
        data = os.urandom(size)
        path = tmp_path / f"task-{len(fds)}"
        path.write_bytes(data)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1], data

    yield make
    for fd in fds:
        os.close(fd)


def _pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(sender, receiver), both non-blocking; the sender's buffer limited to `sndbuf` if given."""
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    if sndbuf is not None:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return left, right


async def _drain(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < count:
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("count", [INLINE_MAX // 4, INLINE_MAX, INLINE_MAX + 4096])
def test_sends_the_exact_range(task_file: MakeTaskFile, count: int) -> None:
    fd, data = task_file(3 * INLINE_MAX)
    offset = 12345

    async def main() -> bytes:
        left, right = _pair()
        with left, right, concurrent.futures.ThreadPoolExecutor(1) as pool:
            loop = asyncio.get_running_loop()
            receiving = loop.create_task(_drain(right, count))
            await sendfile_range(loop, left, fd, offset, count, 5.0, pool)
            return await receiving

    assert asyncio.run(main()) == data[offset : offset + count]


@pytest.mark.parametrize("count", [INLINE_MAX, 8 * INLINE_MAX])
def test_a_reader_that_takes_nothing_times_out(task_file: MakeTaskFile, count: int) -> None:
    fd, _ = task_file(count)

    async def main() -> None:
        left, right = _pair(SMALL_SNDBUF)
        with (
            left,
            right,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            pytest.raises(TimeoutError, match="took no data"),
        ):
            await sendfile_range(asyncio.get_running_loop(), left, fd, 0, count, 0.3, pool)

    asyncio.run(main())


@pytest.mark.parametrize("count", [INLINE_MAX, 8 * INLINE_MAX])
def test_cancelling_shuts_the_socket_down(task_file: MakeTaskFile, count: int) -> None:
    fd, _ = task_file(count)

    async def main() -> None:
        left, right = _pair(SMALL_SNDBUF)
        with left, right, concurrent.futures.ThreadPoolExecutor(1) as pool:
            loop = asyncio.get_running_loop()
            sending = loop.create_task(sendfile_range(loop, left, fd, 0, count, 30.0, pool))
            first = await loop.sock_recv(right, 1024)  # the sender is running and then blocks: full socket
            assert first
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            # the peer sees end of stream once what was queued is read: the frame can never complete
            async with asyncio.timeout(5):
                while await loop.sock_recv(right, 1 << 16):
                    pass

    asyncio.run(main())
