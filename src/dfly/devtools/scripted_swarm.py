"""A stand-in for the daemon's `TaskManager` behind the proxy (`proxy.blob.Downloads`), for tests that run
the real mirror in process: the task's bytes are a file the test wrote, and its events are what the test
puts on `events`, one each time the mirror asks for the next.

Rules: `Started` comes first, with a descriptor of its own for the mirror; then the queued events in
order; None ends the download (as an iterator that stops). `holding()` is a swarm that holds the whole
object already (a local hit: all pieces, then `Finished`). `ask_mirror` starts a mirror, sends it one
request head and returns the status and body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dfly.daemon.local_api_messages import DownloadEvent, DownloadRequest, Finished, PiecesReady, Started

if TYPE_CHECKING:
    from dfly.daemon.proxy.server import RegistryMirror


class ScriptedSwarm:
    def __init__(self, path: Path, body: bytes, piece_length: int) -> None:
        path.write_bytes(body)
        self.path, self.size, self.piece_length = path, len(body), piece_length
        self.events: asyncio.Queue[DownloadEvent | None] = asyncio.Queue()
        self.waiting = asyncio.Event()  # set while the mirror waits for the next event
        self.requests: list[DownloadRequest] = []
        self.evicted: list[str] = []

    @classmethod
    def holding(cls, path: Path, body: bytes, piece_length: int) -> ScriptedSwarm:
        swarm = cls(path, body, piece_length)
        count = -(-len(body) // piece_length)
        for event in (PiecesReady(tuple(range(count))), Finished(), None):
            swarm.events.put_nowait(event)
        return swarm

    async def download(self, request: DownloadRequest) -> AsyncIterator[DownloadEvent]:
        self.requests.append(request)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield Started("t" * 64, self.size, self.piece_length, str(self.path), fd, {})
            while True:
                self.waiting.set()
                event = await self.events.get()
                self.waiting.clear()
                if event is None:
                    return
                yield event
        finally:
            os.close(fd)

    def evict(self, task_id: str) -> None:
        self.evicted.append(task_id)


def ask_mirror(make: Callable[[], RegistryMirror], head: bytes) -> tuple[int, bytes]:
    """Start the mirror `make()` builds on 127.0.0.1, send `head`, read to the end (at most 10 s), stop
    it; the answer's status and body."""

    async def run() -> bytes:
        mirror = make()
        port = await mirror.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            await writer.drain()
            async with asyncio.timeout(10):
                raw = await reader.read(-1)
            writer.close()
            return raw
        finally:
            await mirror.close()

    top, _, body = asyncio.run(run()).partition(b"\r\n\r\n")
    return int(top.split()[1]), body
