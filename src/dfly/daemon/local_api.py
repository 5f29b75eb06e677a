"""The daemon's local API: newline-delimited JSON over a unix stream socket (docs/local-api.md).

Job: accept dfget (and later dfcache / `dfly`) connections, read one request line, log the caller's
peer credentials, hand the request to a `LocalApiBackend`, and stream its events back as JSON lines. With
the `started` event the task file's read-only descriptor is passed (SCM_RIGHTS) so the client, running
as the user, copies pieces into a file it owns: the daemon never opens a user-chosen path.

Rules:
- One request per connection. A bad request line gets an `error` event of kind "usage"; nothing a client
  sends can crash the server or another connection.
- The socket is raw and non-blocking, driven with `loop.sock_*`: ancillary data (the fd) must go out with
  its line, in order, which a stream transport's buffer cannot guarantee.
- EOF or a reset on the connection while a download runs means the client left: its event iterator is
  cancelled and closed (`aclose`). Clients keep their write side open until they are done.
- Every connection task is owned by the server and cancelled by `close()`.
- A `pieces` event carries at most PIECES_PER_EVENT numbers; a larger batch goes out as several.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from dfly.common.errors import ConfigError, DflyError, StorageError, UsageError
from dfly.common.ids import redact_url
from dfly.daemon.local_api_messages import (
    DownloadRequest,
    LocalApiBackend,
    PiecesReady,
    Started,
    encode_event,
    error_event,
    parse_request,
)

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024
REQUEST_READ_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 1024
# A `pieces` event lists at most this many numbers (under 1 MB a line): a task complete in the cache is
# announced in one batch, and a line of millions of pieces exceeded dfget's 16 MiB limit per line.
PIECES_PER_EVENT = 65_536


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
    return pid, uid, gid


class _ClientGone(Exception):
    """The client closed or reset the connection."""


def set_socket_access(path: Path, gid: int, mode: int) -> None:
    """Group and mode of the socket just bound at `path`, never of what a link there points to: the
    name is opened without following links and changed through that very inode (/proc/self/fd), so a
    socket swapped for a symlink (a directory others can write to) cannot make root chmod its target."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(f"{path} is no longer the socket just bound")
        os.chown(f"/proc/self/fd/{fd}", -1, gid)
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


class LocalApiServer:
    def __init__(self, backend: LocalApiBackend, socket_path: Path, mode: int, group: str) -> None:
        self._backend = backend
        self._path = Path(socket_path)
        self._mode = mode
        self._group = group
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket (removing a stale one), set its mode and group, and start accepting.

        Raises ConfigError (one line) when the socket cannot be set up.
        """
        try:
            gid = grp.getgrnam(self._group).gr_gid if self._group else -1
        except KeyError:
            raise ConfigError(f"local_api.group: no such group {self._group!r}") from None
        sock, bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), False
        try:
            self._path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._remove_stale()
            sock.bind(str(self._path))
            bound = True
            set_socket_access(self._path, gid, self._mode)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException as exc:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    self._path.unlink()
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
                raise ConfigError(f"local_api.socket: cannot listen on {self._path}: {reason}") from None
            raise
        self._sock = sock
        self._inode = os.stat(self._path).st_ino
        self._accept_task = asyncio.create_task(self._accept_loop(), name="local-api-accept")
        log.info("local API listening on %s (mode %o)", self._path, self._mode)

    async def close(self) -> None:
        """Stop accepting, cancel every connection (closing their iterators) and remove the socket."""
        tasks = [t for t in (self._accept_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if os.stat(self._path).st_ino == self._inode:
                    self._path.unlink()

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"local_api.socket: {self._path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self._path))
        except OSError:
            self._path.unlink()  # nobody listens: a leftover of an earlier run
            log.info("removed stale socket %s", self._path)
            return
        finally:
            probe.close()
        raise ConfigError(f"local_api.socket: another process is listening on {self._path}")

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("local API accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._handle(conn), name="local-api-conn")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                pid, uid, gid = peer_credentials(conn)
            except OSError:
                pid, uid, gid = -1, -1, -1
            try:
                request = parse_request(await self._read_line(conn))
                if request is None:
                    log.info("local API stats from uid=%d pid=%d", uid, pid)
                    await self._send(conn, {"event": "stats", "stats": self._backend.stats()})
                    return
            except DflyError as exc:
                log.info("local API bad request from uid=%d pid=%d: %s", uid, pid, exc)
                await self._send_quietly(conn, error_event(exc))
                return
            except _ClientGone:
                return
            except Exception as exc:
                log.exception("local API request from uid=%d pid=%d crashed", uid, pid)
                await self._send_quietly(conn, error_event(DflyError(f"internal error in the daemon: {exc}")))
                return
            shown = redact_url(request.url)
            log.info("local API download %s from uid=%d gid=%d pid=%d", shown, uid, gid, pid)
            await self._download_until_gone(conn, request)

    async def _read_line(self, conn: socket.socket) -> bytes:
        """The request line; bytes after it are ignored (one request per connection)."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            async with asyncio.timeout(REQUEST_READ_TIMEOUT_S):
                while b"\n" not in buf:
                    if len(buf) > MAX_REQUEST_BYTES:
                        raise UsageError(f"request line longer than {MAX_REQUEST_BYTES} bytes")
                    try:
                        chunk = await loop.sock_recv(conn, 65536)
                    except OSError:
                        raise _ClientGone from None
                    if not chunk:
                        if buf.strip():
                            raise UsageError("request line not terminated by a newline")
                        raise _ClientGone
                    buf += chunk
        except TimeoutError:
            raise UsageError(f"no request line within {REQUEST_READ_TIMEOUT_S:g}s") from None
        line = bytes(buf).partition(b"\n")[0]
        if len(line) > MAX_REQUEST_BYTES:
            raise UsageError(f"request line longer than {MAX_REQUEST_BYTES} bytes")
        return line

    async def _download_until_gone(self, conn: socket.socket, request: DownloadRequest) -> None:
        """Run the download; a client EOF or reset cancels it."""
        pump = asyncio.create_task(self._pump(conn, request))
        watch = asyncio.create_task(self._wait_eof(conn))
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                log.info("local API client left during %s; download detached", redact_url(request.url))
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)

    async def _wait_eof(self, conn: socket.socket) -> None:
        """Returns when the client closes or resets the connection; anything it sends is ignored."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(OSError):
                if await loop.sock_recv(conn, 4096):
                    continue
            return

    async def _pump(self, conn: socket.socket, request: DownloadRequest) -> None:
        events = self._backend.download(request)
        started = False
        try:
            async for item in events:
                if isinstance(item, Started):
                    if started:
                        raise DflyError("internal error: backend sent Started twice")
                    started = True
                    await self._send_started(conn, item)
                elif not started:
                    raise DflyError(f"internal error: backend sent {type(item).__name__} before Started")
                elif isinstance(item, PiecesReady):
                    for start in range(0, len(item.pieces), PIECES_PER_EVENT):
                        batch = list(item.pieces[start : start + PIECES_PER_EVENT])
                        await self._send(conn, {"event": "pieces", "pieces": batch})
                else:
                    await self._send(conn, {"event": "finished"})
                    return
            raise DflyError("internal error: download ended without Finished")
        except _ClientGone:
            log.info("local API client went away during %s", redact_url(request.url))
        except DflyError as exc:  # a storage failure is this host's problem (disk, quota): not the client's
            level = logging.WARNING if isinstance(exc, StorageError) else logging.INFO
            log.log(level, "local API download %s failed: %s", redact_url(request.url), exc)
            await self._send_quietly(conn, error_event(exc))
        except Exception as exc:
            log.exception("local API download %s crashed", redact_url(request.url))
            await self._send_quietly(conn, error_event(DflyError(f"internal error in the daemon: {exc}")))
        finally:
            aclose: Callable[[], Coroutine[Any, Any, None]] | None = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _send(self, conn: socket.socket, event: dict[str, object] | bytes) -> None:
        data = event if isinstance(event, bytes) else encode_event(event)
        try:
            await asyncio.get_running_loop().sock_sendall(conn, data)
        except OSError:
            raise _ClientGone from None

    async def _send_quietly(self, conn: socket.socket, event: dict[str, object]) -> None:
        with contextlib.suppress(_ClientGone):
            await self._send(conn, event)

    async def _send_started(self, conn: socket.socket, started: Started) -> None:
        fields = ("task_id", "content_length", "piece_length", "task_path")
        data = encode_event({"event": "started"} | {name: getattr(started, name) for name in fields})
        loop = asyncio.get_running_loop()
        fd = started.own_read_fd()
        try:
            while True:
                try:
                    sent = socket.send_fds(conn, [data], [fd])
                    break
                except (BlockingIOError, InterruptedError):
                    await _writable(loop, conn)
                except OSError:
                    raise _ClientGone from None
        finally:
            os.close(fd)
        if sent < len(data):
            await self._send(conn, data[sent:])


async def _writable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(conn.fileno(), _resolve, ready)
    try:
        await ready
    finally:
        loop.remove_writer(conn.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
