"""Port 4001 (aiohttp): the registry mirror (blob GETs through P2P, the rest passed on), the forward
proxy, and CONNECT.

Rules (see registry.py for routing and upstream choice):
- Blob GETs become P2P downloads of the blob's canonical upstream URL (blob.py). Unless the registry is
  in `proxy.public_registries`, the client's own credentials (or none) are first checked upstream
  (access.py): only a 2xx (or a redirect to its storage) lets the swarm's copy be served, anything else
  is the registry's answer (401 with `WWW-Authenticate`, so clients run their token flow). The client's
  `Authorization` travels with the download request (and so in the seed trigger) for the origin reader;
  it is never stored with the task nor logged.
- Pass-through requests (`http_edge.relay`) go to the upstream with the client's method, path, query
  (without `ns`), body and headers (every value of repeated ones such as `Accept`; hop-by-hop headers
  dropped); the answer streams back unchanged (no decompression, no redirect following).
- Errors answer with `X-Dragonfly-Error-Type` (and `X-Dragonfly-Origin-Status` for the origin's own
  answers): 400 bad request, 403 upstream not allowed (no connection is made), 502 for an unreachable
  upstream or a failed download; a blob the client may not read gets the registry's answer to its access
  check (`auth` for 401 / 403, `not_found` for 404). Absolute-form requests (`http_proxy=` clients)
  are the forward proxy (forward.py): allowed targets only, through P2P by the rules (a registry blob
  path as a mirror blob: digest and access checked), else forwarded.
- CONNECT (connect.py does the socket work): `https://host:port` must be allowed (so only port 443 unless
  a port is listed), with proxy auth when configured. A host matching `proxy.hijack_https.hosts` is
  intercepted: TLS is terminated with a certificate from certs.py and its requests are treated exactly
  like forward-proxy requests for `https://host:port/...`; any other host gets a plain byte tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import yarl
from aiohttp import web

from dfly.common.errors import SourceError
from dfly.common.ids import redact_url
from dfly.common.net import host_port, listen_socket
from dfly.daemon.proxy import connect, metrics
from dfly.daemon.proxy.access import check_access
from dfly.daemon.proxy.blob import Downloads, serve_p2p
from dfly.daemon.proxy.forward import (
    DEFAULT_RULES,
    UpstreamResolver,
    compile_rules,
    never_upstream,
    refuse_link_local,
    target_origin,
    task_keys,
    use_p2p,
)
from dfly.daemon.proxy.http_edge import (
    HTTP_LOG,
    IDLE_TIMEOUT_S,
    answer,
    continue_later,
    error_response,
    keep_relayed_headers,
    relay,
)
from dfly.daemon.proxy.registry import (
    BadRequest,
    Forbidden,
    blob_url,
    choose_upstream,
    normalize_upstream,
    registry_blob,
    route,
)

if TYPE_CHECKING:
    from dfly.daemon.proxy.certs import HostCertificates

log = logging.getLogger(__name__)
RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REGISTRY_HEADER = "X-Dragonfly-Registry"
PING_HEADERS = {"Docker-Distribution-Api-Version": "registry/2.0", "Content-Type": "application/json"}
UPSTREAM_HEADER_BYTES = 100 * 1024  # one header line of an upstream's answer, at most
UPSTREAM_HEADER_FIELDS = 1000
SHUTDOWN_GRACE_S = 2.0  # a stop waits at most ~2 × this for proxy requests in flight


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class RegistryMirror:
    def __init__(
        self,
        tasks: Downloads,
        default_upstream: str,
        allowed: Iterable[str],
        rules: Iterable[str] = DEFAULT_RULES,
        basic_auth: tuple[str, str] | None = None,
        public_registries: Iterable[str] = (),
        hijack_hosts: Iterable[str] = (),
        certs: HostCertificates | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        *,
        tunnel_idle_timeout_s: float = 600.0,
        max_connections: int = 4096,
    ) -> None:
        self.tasks = tasks
        self.idle_timeout_s = idle_timeout_s
        self.tunnel_idle_timeout_s = tunnel_idle_timeout_s
        self.max_connections = max_connections
        self.hijack_hosts = compile_rules(list(hijack_hosts)) if certs is not None else ()
        self.certs = certs
        self.public = frozenset(normalize_upstream(r) for r in public_registries)
        self._proxy_auth = _basic(*basic_auth) if basic_auth else None
        self.rules = compile_rules(list(rules))
        self.default_upstream = normalize_upstream(default_upstream) if default_upstream else ""
        self.allowed = frozenset(normalize_upstream(a) for a in allowed) | (
            {self.default_upstream} if self.default_upstream else set()
        )
        self._allowed_origins = tuple(sorted(self.allowed))
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the bound port. Binds first: a port that is
        taken raises OSError with nothing else left open."""
        sock = listen_socket(host, port)
        self._listener = sock
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
            # only the client's own headers go upstream: an added Accept-Encoding got clients a gzip
            # body they never asked for (nothing here decompresses)
            skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
            # answers curl takes (it allows 100 KiB of headers), not aiohttp's 8 KiB lines and 128 fields
            max_line_size=UPSTREAM_HEADER_BYTES,
            max_field_size=UPSTREAM_HEADER_BYTES,
            max_headers=UPSTREAM_HEADER_FIELDS,
            connector=aiohttp.TCPConnector(resolver=UpstreamResolver()),
        )
        plain = await self._runner(self.handle)
        intercepted = await self._runner(self.handle_intercepted)
        loop = asyncio.get_running_loop()

        async def on_plain(conn: socket.socket) -> None:
            await loop.connect_accepted_socket(plain.server, conn)  # type: ignore[arg-type]

        async def on_connect(conn: socket.socket) -> None:
            await self._connect(conn, intercepted)

        def handed_off() -> int:  # the HTTP connections aiohttp serves (keep-alive ones included)
            return sum(len(runner.server.connections) for runner in (plain, intercepted) if runner.server)

        self._accepting = asyncio.create_task(
            connect.accept_loop(sock, on_plain, on_connect, self.max_connections, handed_off)
        )
        return int(sock.getsockname()[1])

    async def _runner(self, serve: RequestHandler) -> web.AppRunner:
        # aiohttp's router matches only targets that start with "/", but `GET http://host HTTP/1.1` (an
        # absolute-form target with an empty path) is valid too: every request reaches `serve` through a
        # middleware, which aiohttp runs around the router's "not found" as well (`handler` is that).
        @web.middleware
        async def every_target(request: web.Request, handler: RequestHandler) -> web.StreamResponse:
            return await serve(request)

        app = web.Application(client_max_size=0, middlewares=[every_target])
        app.on_response_prepare.append(keep_relayed_headers)
        # A route only to carry the expect handler (the middleware serves every target); an absolute-form
        # target with an empty path matches none and gets aiohttp's immediate 100 Continue.
        app.router.add_route("*", "/{tail:.*}", serve, expect_handler=continue_later)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.idle_timeout_s,
            logger=HTTP_LOG,
            # At a stop, requests in flight get this long to end, then as long again once told to
            # (aiohttp's two phases), then are cut: its default, 60 s, held a stop for two minutes.
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*(runner.cleanup() for runner in self._runners))  # their graces at once
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client session for upstream requests (exists once `start` ran)."""
        assert self._session is not None, "RegistryMirror.start() first"
        return self._session

    async def _pass(self, request: web.Request, url: str) -> web.StreamResponse:
        return await relay(self.session, request, yarl.URL(url, encoded=True), self.idle_timeout_s)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A request on port 4001: absolute-form = forward proxy, origin-form = registry mirror."""
        scheme, sep, rest = request.raw_path.partition("://")
        if sep and scheme.lower() in ("http", "https"):  # a scheme is case-insensitive (RFC 9110 §4.2.3)
            response = await answer(self._forward(request, f"{scheme.lower()}://{rest}"))
            metrics.count_response("forward", response)
        else:
            response = await answer(self._mirror(request))
            metrics.count_response("mirror", response)
        return response

    async def handle_intercepted(self, request: web.Request) -> web.StreamResponse:
        """A request inside an intercepted CONNECT: the forward proxy for https://<that authority>/..."""
        assert self.certs is not None
        transport = request.transport
        authority = self.certs.authority_of(transport.get_extra_info("sslcontext") if transport else None)
        response: web.StreamResponse
        if authority is None or not request.raw_path.startswith("/"):
            response = error_response(400, "bad_request", "requests inside a tunnel must be origin-form")
        else:
            url = f"https://{authority}{request.raw_path}"
            response = await answer(self._forward(request, url, tunnelled=True))
        metrics.count_response("forward", response)
        return response

    async def _mirror(self, request: web.Request) -> web.StreamResponse:
        what = route(request.method, request.raw_path.partition("?")[0])  # undecoded: `%2f` is refused
        hint, ns = request.headers.get(REGISTRY_HEADER), request.query.get("ns")
        if what.kind == "ping" and not (hint or ns or self.default_upstream):
            return web.Response(
                status=200, body=b"{}" if request.method == "GET" else None, headers=PING_HEADERS
            )
        upstream = choose_upstream(hint, ns, self.default_upstream, self.allowed)
        await refuse_link_local(upstream)
        if what.kind == "blob":
            return await self._serve_blob(
                request, upstream, blob_url(upstream, what.name, what.digest), what.digest
            )
        # the client's path and query as sent (a bare `?b` stays `?b`), without containerd's `ns`
        raw_path, _, raw_query = request.raw_path.partition("?")
        kept = "&".join(p for p in raw_query.split("&") if p and p.partition("=")[0] != "ns")
        target = upstream + raw_path + (f"?{kept}" if kept else "")
        return await self._pass(request, target)

    async def _serve_blob(
        self, request: web.Request, upstream: str, url: str, digest: str
    ) -> web.StreamResponse:
        """A registry blob through P2P, checked against its digest; unless the registry is public, only
        after the registry accepted the client's own credentials (or none) for it."""
        auth = request.headers.get("Authorization")
        if upstream not in self.public:
            refused = await check_access(self.session, url, auth)
            if refused is not None:
                return refused
        headers = {"Authorization": auth} if auth else {}
        keys = task_keys(request.headers)
        return await serve_p2p(
            request, self.tasks, url, digest, headers, self._allowed_origins, keys, self.idle_timeout_s
        )

    def _proxy_auth_ok(self, given: str) -> bool:
        if self._proxy_auth is None:
            return True
        scheme, _, credentials = given.strip().partition(" ")  # the scheme is case-insensitive (RFC 9110)
        return scheme.lower() == "basic" and hmac.compare_digest(  # header bytes that are not UTF-8 too
            credentials.strip().encode("utf-8", "surrogateescape"),
            self._proxy_auth.removeprefix("Basic ").encode(),
        )

    async def _connect(self, conn: socket.socket, intercepted: web.AppRunner) -> None:
        """A CONNECT: refused (400/403/407/502, then closed), intercepted, or tunnelled."""
        try:
            head, early = await connect.read_head(conn)
            host, port, headers = connect.parse_connect(head)
            if not self._proxy_auth_ok(headers.get("proxy-authorization", "")):
                challenge = {
                    "Proxy-Authenticate": 'Basic realm="dfly"',
                    "X-Dragonfly-Error-Type": "proxy_auth",
                }
                await connect.reply(conn, 407, challenge)
                conn.close()
                metrics.count_connect(failed=True)
                return
            authority = host_port(host, port)
            target_origin(f"https://{authority}/", self.allowed)
        except (BadRequest, Forbidden) as exc:
            status, kind = (403, "forbidden") if isinstance(exc, Forbidden) else (400, "bad_request")
            log.info("CONNECT refused: %s", exc)
            await connect.reply(conn, status, {"X-Dragonfly-Error-Type": kind})
            conn.close()
            metrics.count_connect(failed=True)
            return
        if self.certs is not None and any(rule.search(host) for rule in self.hijack_hosts):
            metrics.count_connect(failed=not await self._intercept(conn, intercepted, authority, host, early))
            return
        try:
            upstream = await connect.open_upstream(host, port, never_upstream, timeout_s=10.0)
        except Forbidden as exc:
            log.info("CONNECT refused: %s", exc)
            await connect.reply(conn, 403, {"X-Dragonfly-Error-Type": "forbidden"})
            conn.close()
            metrics.count_connect(failed=True)
            return
        except OSError as exc:
            log.info("CONNECT %s failed: %s", authority, exc)
            await connect.reply(conn, 502, {"X-Dragonfly-Error-Type": "origin"})
            conn.close()
            metrics.count_connect(failed=True)
            return
        await connect.reply(conn, 200)
        metrics.count_connect(failed=False)
        await connect.tunnel(conn, upstream, early, self.tunnel_idle_timeout_s)

    async def _intercept(
        self, conn: socket.socket, intercepted: web.AppRunner, authority: str, host: str, early: bytes
    ) -> bool:
        """Answer 200, terminate TLS with a certificate for `host`, and serve what comes through; False
        when the client's TLS did not come up (or it sent TLS before our answer)."""
        assert self.certs is not None
        if early:  # TLS bytes sent before our answer could not reach the TLS server below
            await connect.reply(conn, 400, {"X-Dragonfly-Error-Type": "bad_request"})
            conn.close()
            return False
        await connect.reply(conn, 200)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                intercepted.server,  # type: ignore[arg-type]
                conn,
                ssl=self.certs.context_for(authority, host),
                ssl_handshake_timeout=connect.HEAD_TIMEOUT_S,
            )
        except (OSError, ssl.SSLError) as exc:  # e.g. a client that does not trust the CA
            log.info("TLS handshake for %s failed: %s", authority, exc)
            conn.close()
            return False
        return True

    async def _forward(self, request: web.Request, url: str, tunnelled: bool = False) -> web.StreamResponse:
        """An absolute-form request (`http_proxy=` clients) or one inside an intercepted tunnel (whose
        CONNECT was authenticated): through P2P by the rules, else directly."""
        if not tunnelled and not self._proxy_auth_ok(request.headers.get("Proxy-Authorization", "")):
            response = error_response(407, "proxy_auth", "proxy authentication required")
            response.headers["Proxy-Authenticate"] = 'Basic realm="dfly"'
            return response
        origin = target_origin(url, self.allowed)
        await refuse_link_local(origin)
        parts = urlsplit(url)
        # a registry blob's path, whatever its query: the task leaves filtered and empty parameters
        # out, so with a query it could be the very task an authorized client fetched
        blob = registry_blob(request.method, parts.path)
        if blob is not None and use_p2p(request.method, url, request.headers, self.rules, True):
            return await self._serve_blob(request, origin, url, blob.digest)
        if use_p2p(request.method, url, request.headers, self.rules):
            keys = task_keys(request.headers)
            try:
                return await serve_p2p(
                    request, self.tasks, url, None, {}, self._allowed_origins, keys, self.idle_timeout_s
                )
            except SourceError as exc:  # raised only before the answer started
                # The origin's answer could not be a P2P task (no Content-Length, an encoded body) or was
                # an error (401 with its WWW-Authenticate, 404, ...): the client gets it first-hand.
                log.info("%s not through P2P (%s): forwarded directly", redact_url(url), exc)
                return await self._pass(request, url)
        return await self._pass(request, url)
