"""An object served from its P2P task: bytes in order as pieces arrive; a registry blob's digest checked.

Job: `serve_p2p` runs the task through `TaskManager.download` and writes the requested bytes to an
aiohttp response while pieces become available (each piece was CRC-checked when it arrived).

Rules:
- With a `sha256:` digest (registry blobs), when the response reaches the object's end, the whole
  object is hashed in order (also the bytes before a `Range` start, read but not sent); the
  response's last chunk is held back until that digest verifies. On a mismatch the connection is
  closed before that chunk, so a client never completes a wrong blob, and this daemon's copy is evicted
  (the next request downloads it again; other daemons' copies are left alone). A range that ends
  before the blob does is sent once its pieces verified their CRC (there is nothing to hold back).
- Without a digest (forward-proxy downloads) a piece's CRC is only what its parent claims: the check is
  the scheduler's verdict (every piece's digest against the origin reader's), as for dfget, which places
  its file only after `Finished`. So a response reaching the object's end holds its last chunk until
  `Finished`; a piece told again after its bytes went out (the verdict replaced it) closes the
  connection instead, a short body. A range ending before the object's end goes out on the CRCs.
- The task is the URL with the client's `TaskKeys` (forward.task_keys): by default without its signing
  parameters (`ids.DEFAULT_FILTERED_QUERY_PARAMS`: presigned S3, GCS, OSS, ... links), so hosts given
  differently signed links to one object share it.
- Headers: the origin's `Content-Type` (else `application/octet-stream`), `ETag`, `Last-Modified` and
  `Cache-Control` (representation.py), `Content-Length`, `Docker-Content-Digest` (blobs), `Accept-Ranges:
  bytes`, `X-Dragonfly-Task-ID`; `Range` → 206 with `Content-Range` (unless `If-Range` names another
  object: 200), past the end → 416; a current `If-None-Match` / `If-Modified-Since` → 304.
- The status line and headers go out with the first bytes of the body, not when the download starts:
  a download that fails before any byte was sent is still answered as an error (502, or the forward
  proxy's direct fetch), never as a 200 cut short.
- A client that disconnects mid-body ends the response quietly (debug log); the download goes on. So
  does one that stops reading: a chunk it has not taken within `stall_s` per MiB (at least `stall_s`;
  the proxy's `idle_timeout_s`) closes the connection, a short body.
- Bytes go out in chunks: a ready piece and the ready pieces after it, up to CHUNK_BYTES (4 MiB) or one
  piece if larger, with sendfile from the task file: directly when nothing is queued on the
  connection, else through asyncio's loop.sendfile (it waits for room); through TLS, read in a worker
  thread and written. The hash reads a chunk through one reused buffer in a worker thread while that
  chunk is sent; the next chunk's hash starts after it ended, so the hash sees the bytes in order.
  Against reading each chunk into a new buffer and writing it: 0–8 % less daemon CPU in 6 of 6
  alternating cold / warm / hit comparisons, the same time (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import BinaryIO, Protocol

from aiohttp import web

from dfly.common.errors import DflyError, DigestMismatch
from dfly.common.ids import redact_url
from dfly.common.ranges import Unsatisfiable, parse_range
from dfly.daemon.local_api_messages import DownloadEvent, DownloadRequest, Finished, PiecesReady, Started
from dfly.daemon.proxy.forward import TaskKeys
from dfly.daemon.proxy.http_edge import error_response
from dfly.daemon.proxy.representation import VALIDATORS, not_modified, origin_headers, range_applies

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 2 * 3600.0
MiB = 1024 * 1024
CHUNK_BYTES = 4 * MiB
EMPTY_SHA256 = f"sha256:{hashlib.sha256(b'').hexdigest()}"


class Downloads(Protocol):
    """What serve_blob needs of the daemon (TaskManager)."""

    def download(self, request: DownloadRequest) -> AsyncIterator[DownloadEvent]: ...

    def evict(self, task_id: str) -> None:
        """Forget a finished task and delete its file (a blob that failed its digest)."""


def _hash(fd: int, start: int, end: int, hasher: hashlib._Hash, buffer: bytearray) -> asyncio.Future[None]:
    """Hash bytes start..end of the task file into `hasher`, in a worker thread (hashing releases the
    GIL: it overlaps sending the same chunk), through `buffer` (reused: no fresh pages per chunk).
    Callers await one hash before starting the next, so the hash sees the bytes in order."""

    def read_and_hash() -> None:
        view = memoryview(buffer)[: end - start]
        if os.preadv(fd, [view], start) != end - start:
            raise DflyError("task file ended early")
        hasher.update(view)

    future = asyncio.get_running_loop().run_in_executor(None, read_and_hash)
    # its error is retrieved even when nobody awaits it any more (the response was cancelled)
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


@contextlib.asynccontextmanager
async def _taken_within(transport: asyncio.Transport, seconds: float) -> AsyncIterator[None]:
    """A client that does not take a chunk within `seconds` is dropped (ConnectionResetError)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        transport.abort()
        raise ConnectionResetError(f"the client did not take a chunk within {seconds:.0f} s") from None


async def _send(
    request: web.Request, response: web.StreamResponse, file: BinaryIO, start: int, end: int, stall_s: float
) -> None:
    """Bytes start..end of the task file to the client: with sendfile on a plain connection; through
    TLS (an intercepted HTTPS download) read in a worker thread and written (asyncio's own fallback
    would hop threads every 16 KiB)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client gone")
    loop = asyncio.get_running_loop()
    if transport.get_extra_info("sslcontext") is None:
        sent = 0
        if transport.get_write_buffer_size() == 0:  # nothing queued: the bytes may go first, directly
            with contextlib.suppress(BlockingIOError):
                sent = os.sendfile(
                    transport.get_extra_info("socket").fileno(), file.fileno(), start, end - start
                )
        if start + sent < end:  # the socket is full: asyncio waits for room (pausing reads meanwhile)
            async with _taken_within(transport, stall_s * max(1.0, (end - start - sent) / MiB)):
                sent += await loop.sendfile(transport, file, start + sent, end - start - sent)
    else:
        data = await loop.run_in_executor(None, os.pread, file.fileno(), end - start, start)
        async with _taken_within(transport, stall_s * max(1.0, len(data) / MiB)):
            await response.write(data)
        sent = len(data)
    if sent != end - start:  # the connection is closed: the client must not take the short body as whole
        raise DflyError("task file ended early")


def chunk_end(position: int, size: int, stop: int, piece_length: int, ready: set[int]) -> int:
    """End of the next read from `position` (the start of a ready piece): the following ready pieces
    too, up to CHUNK_BYTES in all (at least that one piece) and never past the piece holding `stop - 1`.
    One read, hash and write per chunk instead of per piece: a local hit of a 96 MiB blob (256 KiB
    pieces) measured 0.087–0.115 s piece by piece, 0.070–0.081 s in chunks."""
    end = min(size, (position // piece_length + 1) * piece_length)
    while end < stop and end // piece_length in ready and end + piece_length - position <= CHUNK_BYTES:
        end = min(size, end + piece_length)
    return end


def _headers(digest: str | None, task_id: str, length: int, origin: dict[str, str]) -> dict[str, str]:
    headers = {
        **origin,
        "Content-Length": str(length),
        "Accept-Ranges": "bytes",
        "X-Dragonfly-Task-ID": task_id,
    }
    if digest is not None:
        headers["Docker-Content-Digest"] = digest
    return headers


def _not_modified(task_id: str, origin: dict[str, str]) -> web.Response:
    validators = {name: origin[name] for name in VALIDATORS if name in origin}
    return web.Response(status=304, headers={**validators, "X-Dragonfly-Task-ID": task_id})


async def serve_p2p(
    request: web.Request,
    tasks: Downloads,
    url: str,
    digest: str | None,
    upstream_headers: dict[str, str],
    allowed_origins: tuple[str, ...],
    keys: TaskKeys,
    stall_s: float,
) -> web.StreamResponse:
    """Serve `url` through P2P (checked against `digest` if given); DflyError before any byte is sent.
    Whoever reads the origin contacts only `allowed_origins` (redirect hops included); the task is
    `url` with `keys` (tag, application, the query parameters left out)."""
    download = DownloadRequest(
        url=url, tag=keys.tag, application=keys.application, filtered_query_params=keys.filtered_query_params,
        headers=upstream_headers, piece_length=keys.piece_length, timeout_s=DOWNLOAD_TIMEOUT_S,
        disable_back_to_source=False, allowed_origins=allowed_origins,
    )  # fmt: skip
    events = aiter(tasks.download(download))
    response: web.StreamResponse | None = None
    read_fd = -1
    hashing: asyncio.Future[None] | None = None  # the chunk being hashed (in a worker thread)
    try:
        started = await anext(events)
        if not isinstance(started, Started):
            raise DflyError("the download ended before it started")
        size, piece_length = started.content_length, started.piece_length
        read_fd = started.own_read_fd()  # ours: the task's fd may close if it is evicted
        if size == 0 and digest is not None and digest != EMPTY_SHA256:  # no last chunk to hold back
            tasks.evict(started.task_id)
            raise DigestMismatch(f"blob {digest} from {url} is empty ({EMPTY_SHA256})")
        origin = origin_headers(started.response_headers)
        if not_modified(request.headers, origin):
            return _not_modified(started.task_id, origin)
        wanted = request.headers.get("Range") if range_applies(request.headers, origin) else None
        try:
            span = parse_range(wanted, size) if wanted is not None else None
        except Unsatisfiable:
            unsatisfiable = error_response(416, "range", f"range outside the {size} bytes of the object")
            unsatisfiable.headers["Content-Range"] = f"bytes */{size}"
            return unsatisfiable
        first, last = span if span is not None else (0, size - 1)
        status = 206 if span is not None else 200
        headers = _headers(digest, started.task_id, last - first + 1, origin)
        response = web.StreamResponse(status=status, headers=headers)
        if span is not None:
            response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        ready: set[int] = set()
        # the response ends where the object does: with a digest to check, its end waits for it;
        # without one, it waits for the download's end (the scheduler's verdict)
        whole = last == size - 1 and digest is not None
        verdict_first = last == size - 1 and digest is None
        hasher = hashlib.sha256() if whole else None
        buffer = bytearray(max(CHUNK_BYTES, piece_length) if whole else 0)  # one chunk, hashed through it
        file = open(read_fd, "rb", buffering=0, closefd=False)  # noqa: ASYNC230, SIM115 - wraps read_fd: no I/O
        # next byte to send or hash: from 0 when the whole object is hashed, else the piece holding `first`
        position = begin = 0 if whole else first - first % piece_length
        stop = size if whole else last + 1  # no byte at or past `stop` is read
        finished = False

        def take(event: DownloadEvent) -> None:
            nonlocal finished
            if isinstance(event, PiecesReady):
                if replaced := [n for n in event.pieces if begin <= n * piece_length < position]:
                    raise DigestMismatch(f"piece {replaced[0]} of {url} was replaced after it was sent")
                ready.update(event.pieces)
            finished = finished or isinstance(event, Finished)

        while position < stop and not finished:
            take(await anext(events))
            while position < stop and position // piece_length in ready:
                end = chunk_end(position, size, stop, piece_length, ready)
                while verdict_first and end == size and not finished:
                    take(await anext(events))  # the last chunk: only once the download is verified
                if hasher is not None:
                    if hashing is not None:
                        await hashing  # the previous chunk: in order, and done with the buffer
                    hashing = _hash(read_fd, position, end, hasher, buffer)
                    if end == size:  # the last chunk: only once the whole blob verified
                        await hashing
                        if f"sha256:{hasher.hexdigest()}" != digest:
                            tasks.evict(started.task_id)
                            raise DigestMismatch(f"blob {digest} from {url} has sha256:{hasher.hexdigest()}")
                send_from, send_to = max(first, position), min(last + 1, end)
                if send_from < send_to:
                    if not response.prepared:  # the status goes out with the first bytes, not before
                        await response.prepare(request)
                    await _send(request, response, file, send_from, send_to, stall_s)  # while it is hashed
                position = end
        if not response.prepared:  # an empty body
            await response.prepare(request)
        await response.write_eof()
        return response
    except ConnectionError as exc:  # the client went away mid-body: nothing to answer, nothing to log loudly
        log.debug("%s: client disconnected: %r", digest or redact_url(url), exc)
        return response if response is not None and response.prepared else web.Response(status=499)
    except DflyError as exc:
        if response is None or not response.prepared:  # no byte sent yet: the caller answers the error
            raise
        log.error("%s: %s; closing the connection before its end", digest or redact_url(url), exc)
        if request.transport is not None:
            request.transport.close()  # the client sees a short body, never a complete wrong blob
        return response
    finally:
        try:
            if hashing is not None:
                with contextlib.suppress(Exception):
                    await hashing  # its thread reads read_fd: let it end before the fd closes
        finally:  # also when cancelled while waiting for it
            if read_fd >= 0:
                os.close(read_fd)
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
