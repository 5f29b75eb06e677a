"""Back-to-source over HTTP/HTTPS: stat an origin object, then read it as one sequential GET cut into pieces.

Blocking code meant for a worker thread (the daemon runs each read in one of its own, `in_own_thread`);
the event loop never runs it. Rules (DESIGN.md §5 "Back-to-source"):

- `stat` is a `GET` with `Range: bytes=0-0` (HEAD fails on GET-presigned URLs); 206 gives the total from
  Content-Range, 200 from Content-Length, 416 with `bytes */0` an empty object.
- `read_pieces` sends ONE GET with `Range` from the first wanted byte and `If-Range` with the stat's strong
  ETag (else its Last-Modified), and cuts the body into pieces as it streams: `readinto` straight into the
  caller's buffer, CRC-32 chained per read, `on_piece(number, view, crc)` once a piece is full.
- Requests carry `Accept-Encoding: identity`; the caller's Range, `If-*`, Host and hop-by-hop headers are
  dropped. A response with another Content-Encoding is refused.
- Redirects (301/302/303/307/308, at most 10) are followed (http_open.py); every host contacted, the
  first included, must pass `allowed_hosts` when given. Authorization and Cookie are not forwarded to
  another origin: neither on the stat's redirect hops nor by `read_pieces`, which starts at the stat's
  final URL.
- Only `ALLOWED_RESPONSE_HEADERS` are kept from a response (stored and replayed by the daemon).
- Every failure is a `SourceError` with one line and the origin's status code (0 when no HTTP status was
  received: connection refused, DNS failure, timeout, TLS failure, dropped connection). Query strings are
  left out of messages because presigned URLs carry credentials there.
- `timeout_s` bounds connecting and each socket read, not the whole transfer; `piece_timeout_s` (the
  daemon's `download.piece_timeout_s`, as Dragonfly's `pieceTimeout` for pieces from the source) bounds
  each piece's reading, so an origin that trickles cannot hold the read (piece_deadline.py).
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dfly.common import validators
from dfly.common.digest import crc32
from dfly.common.errors import SourceError
from dfly.common.ids import redact_url
from dfly.common.pieces import piece_count
from dfly.common.request_headers import set_by_daemon
from dfly.daemon.source.http_open import MAX_REDIRECTS as MAX_REDIRECTS
from dfly.daemon.source.http_open import AllowedHosts, open_get, same_origin, without_credentials
from dfly.daemon.source.http_open import SourceInterrupt as SourceInterrupt
from dfly.daemon.source.piece_deadline import PieceDeadline

ALLOWED_RESPONSE_HEADERS = ("Content-Type", "Content-Length", "ETag", "Last-Modified",
                            "Docker-Content-Digest", "Cache-Control")  # fmt: skip
READ_CHUNK_BYTES = 1024 * 1024  # one readinto at most; should_stop is checked between reads


class PieceHandoff(Protocol):
    """What `on_piece` may return: waited on (`result()`) before the piece's buffer slot is reused."""

    def result(self) -> object: ...


@dataclass(frozen=True, slots=True)
class SourceStat:
    """What `stat` learned: the final URL after redirects, the object's length and its validators."""

    url: str
    content_length: int
    headers: dict[str, str] = field(default_factory=dict)  # allow-listed; Content-Length = the total
    etag: str = ""
    last_modified: str = ""
    accept_ranges: bool = True  # False when the origin answered the stat's Range with a plain 200
    requested_url: str = ""  # the URL asked for; credentials go only to its origin ("": same as url)


def same_object(known: Mapping[str, str], stat: SourceStat) -> bool:
    """False when validators recorded earlier (ETag, else Last-Modified) name another object than `stat`;
    True when they agree or there is nothing to compare (common/validators.py)."""
    return validators.same_object(known, {"ETag": stat.etag, "Last-Modified": stat.last_modified})


def sanitize_request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's headers minus Range, If-*, Host, hop-by-hop ones; plus `Accept-Encoding: identity`."""
    named_by_connection = {t.strip().lower() for k, v in headers.items() if k.lower() == "connection"
                           for t in v.split(",")}  # fmt: skip
    out: dict[str, str] = {}
    for name, value in headers.items():
        if set_by_daemon(name) or name.lower() in named_by_connection:
            continue
        out[name] = value
    out["Accept-Encoding"] = "identity"
    return out


def stat(
    url: str,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    allowed_hosts: AllowedHosts | None = None,
    ca_file: str | None = None,
    insecure_skip_verify: bool = False,
    interrupt: SourceInterrupt | None = None,
) -> SourceStat:
    """Length, validators and allow-listed headers of the object at `url` (GET with Range 0-0)."""
    req = sanitize_request_headers(headers)
    req["Range"] = "bytes=0-0"
    conn, resp, final_url = open_get(
        url, req, timeout_s, allowed_hosts, ca_file, insecure_skip_verify, interrupt
    )
    try:
        kept = _allowed(resp)
        if resp.status == 206:
            total = _content_range(resp)[2]
            if total is None:
                raise SourceError(f"origin sent no content length for {redact_url(final_url)}", 206, kept)
        elif resp.status == 200:
            total = _int_header(resp, "Content-Length")
            if total is None:
                raise SourceError(f"origin sent no content length for {redact_url(final_url)}", 200, kept)
        elif resp.status == 416 and (resp.getheader("Content-Range") or "").strip() == "bytes */0":
            total = 0
        else:
            raise _status_error(resp, final_url)
        _check_encoding(resp, final_url)
        kept["Content-Length"] = str(total)
        return SourceStat(
            url=final_url,
            requested_url=url,
            content_length=total,
            headers=kept,
            etag=resp.getheader("ETag") or "",
            last_modified=resp.getheader("Last-Modified") or "",
            accept_ranges=resp.status != 200,
        )
    finally:
        resp.close()
        conn.close()
        if interrupt is not None:
            interrupt.release()


def read_pieces(
    stat: SourceStat,
    headers: Mapping[str, str],
    *,
    piece_length: int,
    first_piece: int = 0,
    last_piece: int | None = None,
    buffer: bytearray | memoryview,
    on_piece: Callable[[int, memoryview, int], PieceHandoff | None],
    should_stop: Callable[[], bool],
    timeout_s: float,
    piece_timeout_s: float | None = None,
    allowed_hosts: AllowedHosts | None = None,
    ca_file: str | None = None,
    insecure_skip_verify: bool = False,
    interrupt: SourceInterrupt | None = None,
) -> int:
    """Stream pieces first_piece..last_piece (inclusive) of `stat`'s object through `buffer`.

    `buffer` holds one or more piece-sized slots used in turn. `on_piece(number, view, crc32)` gets a view
    of the slot holding the whole piece. It either returns None once the bytes are handed off, or returns
    a handle with `.result()` that is waited on before that slot is read into again, so the next piece is
    read from the origin while the previous one is being written. Returns the number of bytes delivered
    through `on_piece`; stops early (dropping a partial piece) when `should_stop()`: between reads, at
    once when `interrupt.interrupt()` comes with it (a blocked connect or read ends), and within
    piece_deadline.STOP_POLL_S when a piece deadline is given. With `piece_timeout_s`, each piece (and
    each piece-sized step of bytes skipped) must arrive within that many seconds of its first read.
    """
    total = stat.content_length
    count = piece_count(total, piece_length) if piece_length > 0 else 0
    last = count - 1 if last_piece is None else last_piece
    # A piece-sized slot; an object of one piece from here on needs only its own bytes.
    largest = min(piece_length, max(0, total - first_piece * piece_length))
    if piece_length <= 0 or len(buffer) < largest or not buffer:
        raise ValueError(f"buffer of {len(buffer)} bytes cannot hold a piece of {largest} bytes")
    if total == 0 or first_piece > last:
        return 0
    if not 0 <= first_piece <= last < count:
        raise ValueError(f"pieces {first_piece}..{last} out of range for {count} pieces")
    start = first_piece * piece_length
    end = min((last + 1) * piece_length, total) - 1
    want = end - start + 1
    interrupt = interrupt if interrupt is not None else SourceInterrupt()  # the piece deadline's too
    if stat.requested_url and not same_origin(stat.requested_url, stat.url):
        headers = without_credentials(headers)  # the stat was redirected to another origin
    req = sanitize_request_headers(headers)
    req["Range"] = f"bytes={start}-{end}"
    validator = _if_range_validator(stat)
    if validator:
        req["If-Range"] = validator
    conn, resp, url = open_get(
        stat.url, req, timeout_s, allowed_hosts, ca_file, insecure_skip_verify, interrupt
    )
    deadline: PieceDeadline | None = None
    try:
        skip = _check_body_response(resp, stat, url, start, end, bool(validator))
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        received = 0
        if piece_timeout_s is not None:
            deadline = PieceDeadline(interrupt.shut, piece_timeout_s, should_stop)

        def fill(target: memoryview, crc: int, what: str) -> tuple[int, bool]:
            nonlocal received
            got = 0
            if deadline is not None:
                deadline.arm()
            try:
                while got < len(target):
                    if should_stop():
                        return crc, False
                    chunk = target[got : got + READ_CHUNK_BYTES]
                    try:
                        n = resp.readinto(chunk)
                    except (OSError, http.client.HTTPException) as exc:
                        if should_stop():  # the watchdog shut the connection down for the stop
                            return crc, False
                        raise _fill_error(
                            deadline, what, len(target), url, received + got, want + skip, exc
                        ) from exc
                    if n == 0:
                        if should_stop():
                            return crc, False
                        raise _fill_error(deadline, what, len(target), url, received + got, want + skip, None)
                    crc = crc32(chunk[:n], crc)
                    got += n
            finally:
                if deadline is not None:
                    deadline.disarm()
            received += got
            return crc, True

        while skip:  # an origin without Range support: read and drop the bytes before `start`
            step = min(skip, len(view), piece_length)
            if not fill(view[:step], 0, f"bytes {received}-{received + step - 1} (skipped)")[1]:
                return 0
            skip -= step
        delivered = 0
        slots = max(1, len(view) // piece_length)
        pending: list[PieceHandoff | None] = [None] * slots
        try:
            for number in range(first_piece, last + 1):
                slot = number % slots
                if (handoff := pending[slot]) is not None:
                    pending[slot] = None
                    handoff.result()
                size = min(piece_length, total - number * piece_length)
                piece = view[slot * piece_length : slot * piece_length + size]
                crc, complete = fill(piece, 0, f"piece {number}")
                if not complete:
                    break
                pending[slot] = on_piece(number, piece, crc)
                delivered += size
        finally:
            for handoff in pending:  # never return while a slot is still being read by its consumer
                if handoff is not None:
                    handoff.result()
        return delivered
    finally:
        if deadline is not None:
            deadline.close()
        resp.close()
        conn.close()
        interrupt.release()


def _check_body_response(
    resp: http.client.HTTPResponse, stat: SourceStat, url: str, start: int, end: int, sent_if_range: bool
) -> int:
    """Validate a ranged response; return how many leading bytes to skip (a 200 from a range-less origin)."""
    kept = _allowed(resp)
    changed = f"origin object changed since stat: {redact_url(url)}"
    if resp.status == 206:
        first, last, total = _content_range(resp)
        if total is not None and total != stat.content_length:
            raise SourceError(f"{changed} (length {total}, was {stat.content_length})", 206, kept)
        if (first, last) != (start, end):
            raise SourceError(
                f"origin sent bytes {first}-{last} but {start}-{end} were asked of {redact_url(url)}",
                206,
                kept,
            )
        skip = 0
    elif resp.status == 200:
        if sent_if_range and stat.accept_ranges:
            raise SourceError(changed, 200, kept)
        length = _int_header(resp, "Content-Length")
        if length is not None and length != stat.content_length:
            raise SourceError(f"{changed} (length {length}, was {stat.content_length})", 200, kept)
        skip = start
    elif resp.status == 416:
        raise SourceError(f"{changed} (range {start}-{end} no longer satisfiable)", 416, kept)
    else:
        raise _status_error(resp, url)
    etag = resp.getheader("ETag")  # compared weakly: different opaque tags mean another object
    if stat.etag and etag and etag.removeprefix("W/") != stat.etag.removeprefix("W/"):
        raise SourceError(f"{changed} (ETag {etag}, was {stat.etag})", resp.status, kept)
    _check_encoding(resp, url)
    return skip


def _if_range_validator(stat: SourceStat) -> str:
    if stat.etag and not stat.etag.startswith("W/"):  # weak ETags are not allowed in If-Range
        return stat.etag
    return stat.last_modified


def _fill_error(
    deadline: PieceDeadline | None,
    what: str,
    size: int,
    url: str,
    received: int,
    expected: int,
    exc: BaseException | None,
) -> SourceError:
    if deadline is not None and deadline.expired:
        return SourceError(
            f"the origin sent {what} ({size} bytes) too slowly: not within download.piece_timeout_s "
            f"({deadline.piece_timeout_s:g} s), after {received} of {expected} bytes from {redact_url(url)}",
            0,
        )
    return _read_error(url, received, expected, exc)


def _read_error(url: str, received: int, expected: int, exc: BaseException | None) -> SourceError:
    # bytes taken in whole read chunks: a chunk a timeout cut short is not counted
    where = f"after {received} of {expected} bytes from {redact_url(url)}"
    if exc is None:
        return SourceError(f"origin closed the connection {where}", 0)
    if isinstance(exc, TimeoutError):
        return SourceError(f"the origin sent nothing for the read timeout {where}", 0)
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return SourceError(f"reading the origin failed {where}: {reason}", 0)


def _status_error(resp: http.client.HTTPResponse, url: str) -> SourceError:
    return SourceError(
        f"origin returned {resp.status} {resp.reason} for {redact_url(url)}", resp.status, _allowed(resp)
    )


def _check_encoding(resp: http.client.HTTPResponse, url: str) -> None:
    encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise SourceError(
            f"origin sent Content-Encoding {encoding} for {redact_url(url)} although identity was asked",
            resp.status,
            _allowed(resp),
        )


def _allowed(resp: http.client.HTTPResponse) -> dict[str, str]:
    return {name: value for name in ALLOWED_RESPONSE_HEADERS if (value := resp.getheader(name)) is not None}


def _int_header(resp: http.client.HTTPResponse, name: str) -> int | None:
    value = (resp.getheader(name) or "").strip()
    return int(value) if value.isdigit() else None


def _content_range(resp: http.client.HTTPResponse) -> tuple[int, int, int | None]:
    """(first, last, total or None) of a 206's `Content-Range: bytes first-last/total`."""
    value = (resp.getheader("Content-Range") or "").strip()
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not first.strip().isdigit() or not last.strip().isdigit():
        raise SourceError(f"origin sent a bad Content-Range {value!r}", resp.status, _allowed(resp))
    total = total.strip()
    return int(first), int(last), int(total) if total.isdigit() else None
