"""The proxy's HTTP plumbing around its handlers (server.py): error answers, headers passed on, the
client's body on its way upstream, requests relayed to an upstream unchanged, and aiohttp's own logging.

Rules:
- An error is answered with `X-Dragonfly-Error-Type` (and `X-Dragonfly-Origin-Status` for an origin's
  own answer) and a one-line text body; request bytes quoted in it are escaped, never an encoding error.
- Hop-by-hop headers, `Host`, `Content-Length` and our own `X-Dragonfly-*` headers are never passed on.
- An upstream's answer is relayed with its own header fields only: the `Content-Type` and `Server` that
  aiohttp gives every answer lacking them are taken out again (`Relayed`, `keep_relayed_headers`), so a
  client sniffs an untyped body as it would without the proxy. `Date` is added when missing (RFC 9110
  §6.6.1 asks a forwarding recipient to).
- A relayed answer that fails once it has started ends by closing the connection: a short body, never
  a wrong one.
- A connection with no request in progress, or a request body, idle for `proxy.idle_timeout_s` ends.
- `Expect: 100-continue` is answered here when the body is wanted, not before the request was allowed,
  and not passed upstream.
- A request aiohttp cannot parse is one INFO line in the log (no traceback per request), without the
  request bytes aiohttp quotes (they may hold credentials).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Iterable

import aiohttp
import yarl
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from dfly.common.errors import (
    DflyError,
    OutOfDescriptors,
    SourceError,
    UsageError,
    is_out_of_descriptors,
    out_of_descriptors,
)
from dfly.common.ids import printable
from dfly.daemon.proxy.registry import BadRequest, Forbidden

HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "host",
        "content-length",
    ]
)
# An HTTP connection with no request in progress (idle keep-alive, or a request head that never
# completes) is closed after this long (config proxy.idle_timeout_s); aiohttp's default is an hour.
IDLE_TIMEOUT_S = 60.0


async def client_body(content: aiohttp.StreamReader, idle_s: float) -> AsyncIterator[bytes]:
    """A client's request body on its way upstream. A client that sends nothing for `idle_s` ends the
    request: so does a chunked body that turns malformed mid-way, which aiohttp's parser drops without
    ending the stream (the request then waited forever)."""
    while True:
        async with asyncio.timeout(idle_s):
            chunk = await content.readany()
        if not chunk:
            return
        yield chunk


# Where aiohttp's reason starts quoting the request's bytes: a bytes repr (`Got more than 8190 bytes
# when reading: b'http://user:password@...'`), or a quoted string that runs to the line's end (`Bad
# status line 'GET ...'`); a quoted name inside the text (`Duplicate 'Content-Length' header`) stays.
QUOTED_BYTES = re.compile(r"""[:\s]*(?:bytearray\(|(?<![\w'"])b['"]).*""")
QUOTED_TO_THE_END = re.compile(r"""[:\s]*(?<=\s)['"].*['"][.)]?$""")


def parse_failure_reason(message: str) -> str:
    """aiohttp's reason for a request it could not parse, without the request bytes it quotes (a URL's
    user info or query, an Authorization or Cookie value): its first line, the quote cut off."""
    first_line = message.strip().split("\n", 1)[0].rstrip(": ")
    reason = QUOTED_TO_THE_END.sub("", QUOTED_BYTES.sub("", first_line)).rstrip(": ")
    return printable(reason) + (" (request bytes not logged)" if reason != first_line else "")


def expectations(request: web.Request) -> set[str]:
    return {token.strip().lower() for token in request.headers.get("Expect", "").split(",") if token.strip()}


async def continue_later(request: web.Request) -> None:
    """The expect handler: `Expect: 100-continue` is answered only when the body is about to be read
    (`send_continue`), as Go's net/http does. aiohttp's default answered it at once, so a client then
    refused (403, 407) had already begun to upload its body. Other expectations get 417, as there."""
    if request.version >= HttpVersion11 and expectations(request) - {"100-continue"}:
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers.get('Expect', '')}")


async def send_continue(request: web.Request) -> None:
    """Tell a client that waits for it (`Expect: 100-continue`) to send its body now."""
    if request.version >= HttpVersion11 and "100-continue" in expectations(request):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's (as aiohttp resets it)


class BadRequestsInOneLine(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback, so any client could fill
    the log: those become one INFO line with the reason, never the request bytes aiohttp quotes in it
    (`parse_failure_reason`). Anything else (an exception in a handler) stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = parse_failure_reason(str(exc.message))
            record.msg = f"{record.getMessage()}: {reason}"
            record.args = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


HTTP_LOG = logging.getLogger("dfly.daemon.proxy.http")
HTTP_LOG.addFilter(BadRequestsInOneLine())


def error_response(status: int, kind: str, message: str, origin_status: int = 0) -> web.Response:
    headers = {"X-Dragonfly-Error-Type": kind}
    if origin_status:
        headers["X-Dragonfly-Origin-Status"] = str(origin_status)
    # The message may quote request bytes that are no text (aiohttp keeps them as surrogate escapes).
    text = (message + "\n").encode("utf-8", "backslashreplace")
    return web.Response(status=status, body=text, content_type="text/plain", charset="utf-8", headers=headers)


def hop_by_hop(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The fixed hop-by-hop names plus those a message lists in its own `Connection` header (RFC 9110
    §7.6.1), lower-case: none of them goes past a proxy."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return HOP_BY_HOP | listed


AIOHTTP_DEFAULTS = ("Content-Type", "Server")  # fields aiohttp's server adds to an answer lacking them


class Relayed(web.StreamResponse):
    """The answer relaying an upstream's: its status, reason and end-to-end header fields."""

    def __init__(self, status: int, reason: str | None, upstream: Iterable[tuple[str, str]]) -> None:
        super().__init__(status=status, reason=reason)
        pairs = list(upstream)
        dropped = hop_by_hop(pairs)
        for name, value in pairs:
            if name.lower() not in dropped:
                self.headers.add(name, value)
        self.not_sent = tuple(name for name in AIOHTTP_DEFAULTS if name not in self.headers)


async def keep_relayed_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: a relayed answer goes out without the defaults aiohttp just added."""
    if isinstance(response, Relayed):
        for name in response.not_sent:
            response.headers.popall(name, None)


def forwarded_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    pairs = list(headers)
    dropped = hop_by_hop(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() not in dropped and not name.lower().startswith("x-dragonfly-"):  # ours, not theirs
            out.add(name, value)
    return out


async def answer(handling: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """The handler's response, or the error response for what it raised."""
    try:
        return await handling
    except BadRequest as exc:
        return error_response(400, "bad_request", str(exc))
    except Forbidden as exc:
        return error_response(403, "forbidden", str(exc))
    except UsageError as exc:  # a request the download cannot be made from (bad header bytes, say)
        return error_response(400, "bad_request", str(exc))
    except OutOfDescriptors as exc:  # this host's load, not the origin's fault: the client may retry
        busy = error_response(503, exc.kind, str(exc))
        busy.headers["Retry-After"] = "1"
        return busy
    except SourceError as exc:
        status = exc.status_code if 400 <= exc.status_code < 500 else 502
        return error_response(status, "origin", str(exc), exc.status_code)
    except DflyError as exc:
        return error_response(502, exc.kind if hasattr(exc, "kind") else "download", str(exc))


async def relay(
    session: aiohttp.ClientSession, request: web.Request, url: yarl.URL, idle_timeout_s: float
) -> web.StreamResponse:
    """Send the request on to `url` and stream the answer back unchanged. Once the answer has started,
    a failure on either side ends it by closing the connection (a short body, never a wrong one)."""
    body = client_body(request.content, idle_timeout_s) if request.body_exists else None
    if body is not None:
        await send_continue(request)
    response: web.StreamResponse | None = None
    try:
        headers = forwarded_headers(request.headers.items())
        # answered here (send_continue): forwarded, aiohttp's client would wait for the upstream's
        # 100 Continue before sending the body, for ever from an upstream that sends none
        headers.popall("Expect", None)
        if body is not None and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)  # not re-chunked: some need it
        async with session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream_response:
            response = Relayed(
                upstream_response.status, upstream_response.reason, upstream_response.headers.items()
            )
            if "Content-Length" in upstream_response.headers:
                response.content_length = int(upstream_response.headers["Content-Length"])
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream_response.content.iter_chunked(256 * 1024):
                    await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        if response is not None and response.prepared:
            HTTP_LOG.info("%s %s ended early: %r", request.method, url.origin(), exc)
            if request.transport is not None:
                request.transport.close()
            return response
        if is_out_of_descriptors(exc):
            raise out_of_descriptors("connecting upstream") from None
        if isinstance(exc, aiohttp.ClientResponseError):  # it answered, but not in HTTP we can read
            reason = parse_failure_reason(str(exc.message))
            raise SourceError(f"{url.origin()} sent an answer that cannot be read: {reason}") from None
        raise SourceError(f"{url.origin()} unreachable: {exc}") from None
