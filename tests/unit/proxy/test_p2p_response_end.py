"""A forward-proxy P2P response (no sha256 to check) completes only once the download is verified.

A piece's CRC is what its parent claims; the scheduler's verdict (every piece's digest against the
origin reader's) comes with `Finished`. So the real mirror, in process, on a swarm we script: the last
chunk waits for `Finished`, and a piece told again after its bytes went out cuts the body short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.daemon.local_api_messages import DownloadEvent, Finished, PiecesReady
from dfly.daemon.proxy.server import RegistryMirror
from dfly.devtools.origin import Origin
from dfly.devtools.scripted_swarm import ScriptedSwarm

pytestmark = pytest.mark.timeout(30)

PIECE = 4096
BODY = bytes(range(256)) * 48  # 3 pieces
PIECES = len(BODY) // PIECE


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "origin") as running:
        yield running


async def _collect(reader: asyncio.StreamReader, into: bytearray) -> None:
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            into.extend(chunk)


async def _scenario(origin: Origin, swarm: ScriptedSwarm, script: list[DownloadEvent]) -> tuple[bytes, bytes]:
    """A P2P GET through the forward proxy, the script played one event each time the mirror asks.
    Returns what arrived once the mirror took the script's last event (then asked for more, or closed
    the connection), and what arrived in all (after a `Finished`, if it asked)."""
    mirror = RegistryMirror(swarm, "", [f"http://127.0.0.1:{origin.port}"])
    port = await mirror.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        url = f"http://127.0.0.1:{origin.port}/model.bin"
        head = f"GET {url} HTTP/1.1\r\nHost: x\r\nX-Dragonfly-Use-P2P: true\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        received = bytearray()
        closed = asyncio.ensure_future(_collect(reader, received))
        for event in script:
            await asyncio.wait_for(swarm.waiting.wait(), timeout=5)
            swarm.events.put_nowait(event)
        asking = asyncio.ensure_future(swarm.waiting.wait())
        await asyncio.wait([closed, asking], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        before = bytes(received)
        if not closed.done():
            swarm.events.put_nowait(Finished())
        await closed
        asking.cancel()
        writer.close()
        return before, bytes(received)
    finally:
        await mirror.close()


def _body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""


def test_the_last_chunk_waits_for_the_download_to_be_verified(origin: Origin, tmp_path: Path) -> None:
    swarm_ready = PiecesReady(tuple(range(PIECES)))  # all pieces arrived, CRCs as the parents said

    async def run() -> tuple[bytes, bytes]:
        return await _scenario(origin, ScriptedSwarm(tmp_path / "task", BODY, PIECE), [swarm_ready])

    before, everything = asyncio.run(run())
    assert len(_body(before)) < len(BODY)  # not complete while the verdict is out
    assert _body(everything) == BODY  # and complete once it came
    assert not origin.request_log()  # served from the swarm


def test_a_piece_replaced_after_it_went_out_cuts_the_body_short(origin: Origin, tmp_path: Path) -> None:
    script: list[DownloadEvent] = [
        PiecesReady((0, 1)),  # sent at once: not the object's end
        PiecesReady((2,)),  # the last chunk: held
        PiecesReady((0,)),  # the verdict replaced piece 0, whose old bytes the client already has
    ]

    async def run() -> tuple[bytes, bytes]:
        return await _scenario(origin, ScriptedSwarm(tmp_path / "task", BODY, PIECE), script)

    before, everything = asyncio.run(run())
    assert before == everything  # closed by the mirror, not waiting for more
    assert len(_body(everything)) == 2 * PIECE  # before the object's end
