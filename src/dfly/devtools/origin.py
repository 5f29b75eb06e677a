"""A real HTTP/1.1 origin server for tests, demos and benchmarks, plus fast deterministic test files.

`Origin` serves the files under a root and in-memory objects from a keep-alive `ThreadingHTTPServer`
(optional TLS): `GET`/`HEAD`, one `Range: bytes=a-b | a- | -n` (206 + Content-Range; several ranges get
the full 200), `If-Range` on ETag or Last-Modified, 404 for a missing path, 416 for an unsatisfiable range.
File bodies go out with `os.sendfile` (`pread` + `sendall` under TLS). It counts body bytes sent (total,
per path) and requests, in-process (`bytes_sent`, `requests`, `stats()`) and at `GET /_stats` (JSON, not
counted). Test hooks: `add_bytes`, `add_redirect`, `drop_after` (cut a body short and close), `rotate_etag`,
`ranges_enabled = False`, `request_log()`, `rate_limit_bytes_per_s` (one pace for all connections).
CLI: `python -m dfly.devtools.origin --root DIR [--port N] [--ready-file P]` prints the base URL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mimetypes
import os
import random
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast
from urllib.parse import quote, unquote, urlsplit

from dfly.common.net import host_port
from dfly.common.pieces import MiB, parse_size
from dfly.common.ranges import Unsatisfiable, parse_range

STATS_PATH = "/_stats"
_SEND_CHUNK_BYTES = 4 * MiB
_PACED_CHUNK_BYTES = 64 * 1024
_COUNTER_STRIDE = 4096  # make_file: a counter every 4 KiB so that no two 4 KiB blocks of a file are equal


class RequestRecord(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    target: str = ""  # the request target as sent, query string included


@dataclass(slots=True)
class _Resource:
    size: int
    etag: str
    last_modified: str
    content_type: str
    file: BinaryIO | None = None
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        origin = cast(_Server, self.server).origin
        path = unquote(urlsplit(self.path).path)
        if path == STATS_PATH:
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(origin.stats()).encode(), head)
            return
        origin._note_request(RequestRecord(self.command, path, dict(self.headers.items()), self.path))
        if (redirect := origin._redirects.get(path)) is not None:
            self._reply(redirect[1], {"Location": redirect[0]}, b"", head)
            return
        if (resource := origin._resolve(path)) is None:
            self._reply(404, {"Content-Type": "text/plain"}, b"not found\n", head)
            return
        with resource.file or contextlib.nullcontext():
            self._serve_resource(origin, path, resource, head)

    def _serve_resource(self, origin: Origin, path: str, res: _Resource, head: bool) -> None:
        etag = origin._etag_of_this_response(path, res.etag)
        headers = {"Content-Type": res.content_type, "ETag": etag, "Last-Modified": res.last_modified,
                   "Accept-Ranges": "bytes" if origin.ranges_enabled else "none", **res.headers}  # fmt: skip
        span, range_header, if_range = None, self.headers.get("Range"), self.headers.get("If-Range")
        if origin.ranges_enabled and range_header and if_range in (None, etag, res.last_modified):
            try:
                span = parse_range(range_header, res.size)
            except Unsatisfiable:
                self._reply(416, {"Content-Range": f"bytes */{res.size}"}, b"", head)
                return
        first, last = span if span is not None else (0, res.size - 1)
        if span is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{res.size}"
        length = last - first + 1
        self.send_response(206 if span is not None else 200)
        for name, value in {**headers, "Content-Length": str(length)}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self._send_body(origin, path, res, first, length)

    def _send_body(self, origin: Origin, path: str, res: _Resource, first: int, length: int) -> None:
        limit = min(origin._drops.get(path, length), length)
        sock = self.connection
        chunk = _PACED_CHUNK_BYTES if origin.rate_limit_bytes_per_s else _SEND_CHUNK_BYTES
        tls = isinstance(sock, ssl.SSLSocket)
        data = memoryview(res.data)
        sent = 0
        try:
            while sent < limit:
                n, at = min(chunk, limit - sent), first + sent
                origin._pace(n)
                if res.file is not None and not tls:
                    n = os.sendfile(sock.fileno(), res.file.fileno(), at, n)
                else:
                    block = data[at : at + n] if res.file is None else os.pread(res.file.fileno(), n, at)
                    sock.sendall(block)
                    n = len(block)
                if n == 0:  # the file shrank under us
                    break
                sent += n
                origin._count(path, n)
        finally:
            if sent < length:
                self.close_connection = True

    def _reply(self, status: int, headers: Mapping[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, origin: Origin, address: tuple[str, int], tls: ssl.SSLContext | None) -> None:
        self.origin, self.tls = origin, tls
        if ":" in address[0]:  # an IPv6 address (the class attribute is IPv4's)
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock = cast(socket.socket, request)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except OSError:  # ssl.SSLError included
                return
        with self.origin._lock:
            self.origin._conns.add(sock)
        try:
            super().finish_request(sock, client_address)
        finally:
            with self.origin._lock:
                self.origin._conns.discard(sock)
            if sock is not request:
                sock.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up mid-body are normal here
            super().handle_error(request, client_address)


class Origin:
    """An in-process origin: `with Origin(root) as origin: urlopen(origin.url("file.bin"))`."""

    def __init__(self, root: Path | None = None, host: str = "127.0.0.1", port: int = 0, *,
                 rate_limit_bytes_per_s: float | None = None,
                 certfile: str | Path | None = None, keyfile: str | Path | None = None) -> None:  # fmt: skip
        self.root = root.resolve() if root is not None else None
        self.rate_limit_bytes_per_s = rate_limit_bytes_per_s
        self.ranges_enabled = True
        tls = None
        if certfile is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None)
        self.scheme = "https" if tls is not None else "http"
        self._lock = threading.Lock()
        self._bytes_sent = self._requests = 0
        self._by_path: dict[str, int] = {}
        self._log: deque[RequestRecord] = deque(maxlen=1000)
        self._memory: dict[str, _Resource] = {}
        self._redirects: dict[str, tuple[str, int]] = {}
        self._drops: dict[str, int] = {}
        self._etag_rotations: dict[str, int] = {}  # path -> responses so far (rotate_etag)
        self._next_send_at = 0.0
        self._conns: set[socket.socket] = set()
        self._server = _Server(self, (host, port), tls)
        self.host, self.port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Origin:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{host_port(self.host, self.port)}"

    def url(self, path: str) -> str:
        """The URL of `path`; a query string after `?` is kept as given (and ignored by the server)."""
        name, sep, query = path.lstrip("/").partition("?")
        return f"{self.base_url}/{quote(name)}{sep}{query}"

    # content and test hooks
    def add_bytes(self, path: str, data: bytes, *, headers: Mapping[str, str] | None = None) -> str:
        """Serve `data` at `path` (with extra response headers); returns its URL."""
        etag, kind = f'"{hashlib.sha256(data).hexdigest()[:20]}"', _content_type(path)
        res = _Resource(len(data), etag, formatdate(usegmt=True), kind, None, data, dict(headers or {}))
        self._memory["/" + path.lstrip("/")] = res
        return self.url(path)

    def add_redirect(self, path: str, location: str, status: int = 302) -> str:
        self._redirects["/" + path.lstrip("/")] = (location, status)
        return self.url(path)

    def drop_after(self, path: str, body_bytes: int | None) -> None:
        """Send at most `body_bytes` of each body at `path`, then close the connection (None: whole
        bodies again)."""
        key = "/" + path.lstrip("/")
        if body_bytes is None:
            self._drops.pop(key, None)
        else:
            self._drops[key] = body_bytes

    def rotate_etag(self, path: str) -> None:
        """Give each response at `path` an ETag of its own for the same bytes, as load-balanced backends
        whose ETags differ (inode, mtime) do; `If-Range` then never matches."""
        self._etag_rotations["/" + path.lstrip("/")] = 0

    # statistics
    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._bytes_sent

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_path = dict(self._by_path)
            return {"bytes_sent": self._bytes_sent, "requests": self._requests, "by_path": by_path}

    def reset_stats(self) -> None:
        with self._lock:
            self._bytes_sent, self._requests = 0, 0
            self._by_path.clear()
            self._log.clear()

    # used by the handler threads
    def _note_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests += 1
            self._log.append(record)

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self._bytes_sent += n
            self._by_path[path] = self._by_path.get(path, 0) + n

    def _etag_of_this_response(self, path: str, etag: str) -> str:
        with self._lock:
            if path not in self._etag_rotations:
                return etag
            self._etag_rotations[path] += 1
            return f'"{etag.strip(chr(34))}-{self._etag_rotations[path]}"'

    def _pace(self, n: int) -> None:
        rate = self.rate_limit_bytes_per_s
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send_at)
            self._next_send_at = start + n / rate
        if start > now:
            time.sleep(start - now)

    def _resolve(self, path: str) -> _Resource | None:
        memory = self._memory.get(path)
        if memory is not None or self.root is None:
            return memory
        candidate = (self.root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        try:
            f = open(candidate, "rb")  # noqa: SIM115 - closed by the handler after the body
        except OSError:
            return None
        st = os.fstat(f.fileno())
        etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
        modified = formatdate(st.st_mtime, usegmt=True)
        return _Resource(st.st_size, etag, modified, _content_type(path), cast(BinaryIO, f))


def _content_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def _blocks(size: int, seed: int) -> Iterator[bytes]:
    base = random.Random(seed).randbytes(MiB)
    for index in range(-(-size // MiB)):
        block = bytearray(base)
        counter = index * (MiB // _COUNTER_STRIDE)
        for at in range(0, MiB, _COUNTER_STRIDE):
            block[at : at + 8] = (counter + at // _COUNTER_STRIDE).to_bytes(8, "little")
        yield bytes(block[: min(MiB, size - index * MiB)])


def pseudo_random_bytes(size: int, seed: int = 0) -> bytes:
    """The same bytes `make_file(path, size, seed)` writes."""
    return b"".join(_blocks(size, seed))


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """Write `size` deterministic pseudo-random bytes (no two 4 KiB blocks equal); return their sha256 hex."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for block in _blocks(size, seed):
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dfly.devtools.origin", description="Serve a directory over HTTP for dfly tests."
    )
    parser.add_argument("--root", type=Path, required=True, help="directory whose files are served")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: the kernel chooses")
    parser.add_argument("--ready-file", type=Path, help="write {role, pid, url, ports} here once serving")
    parser.add_argument("--rate-limit", help="bytes per second for all bodies together, e.g. 100MiB")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory")
    rate = float(parse_size(args.rate_limit)) if args.rate_limit else None
    origin = Origin(args.root, args.host, args.port, rate_limit_bytes_per_s=rate)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with origin:
        if args.ready_file is not None:
            ready = {"role": "origin", "pid": os.getpid(), "url": origin.base_url,
                     "ports": {"http": origin.port}}  # fmt: skip
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(args.ready_file)
        print(origin.base_url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
