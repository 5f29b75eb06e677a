"""sendfile_range: both paths (on the loop up to INLINE_MAX, an upload thread above) deliver the exact
bytes, give up after the stall timeout, and shut the socket down when the caller is cancelled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
from pathlib import Path

import pytest

from dfly.daemon.transfer.sendfile import INLINE_MAX, sendfile_range


def _task_file(tmp_path: Path, size: int) -> tuple[int, bytes]:
    data = os.urandom(size)
    path = tmp_path / "task"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY), data


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
def test_sends_the_exact_range(tmp_path: Path, count: int) -> None:
    fd, data = _task_file(tmp_path, 3 * INLINE_MAX)
    offset = 12345

    async def main() -> bytes:
        left, right = socket.socketpair()
        left.setblocking(False)
        right.setblocking(False)
        with left, right, concurrent.futures.ThreadPoolExecutor(1) as pool:
            loop = asyncio.get_running_loop()
            receiving = loop.create_task(_drain(right, count))
            await sendfile_range(loop, left, fd, offset, count, 5.0, pool)
            return await receiving

    try:
        assert asyncio.run(main()) == data[offset : offset + count]
    finally:
        os.close(fd)


@pytest.mark.parametrize("count", [INLINE_MAX, 8 * INLINE_MAX])
def test_a_reader_that_takes_nothing_times_out(tmp_path: Path, count: int) -> None:
    fd, _ = _task_file(tmp_path, count)

    async def main() -> None:
        left, right = socket.socketpair()
        left.setblocking(False)
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        with (
            left,
            right,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            pytest.raises(TimeoutError, match="took no data"),
        ):
            await sendfile_range(asyncio.get_running_loop(), left, fd, 0, count, 0.3, pool)

    try:
        asyncio.run(main())
    finally:
        os.close(fd)


@pytest.mark.parametrize("count", [INLINE_MAX, 8 * INLINE_MAX])
def test_cancelling_shuts_the_socket_down(tmp_path: Path, count: int) -> None:
    fd, _ = _task_file(tmp_path, count)

    async def main() -> None:
        left, right = socket.socketpair()
        left.setblocking(False)
        right.setblocking(False)
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
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

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
