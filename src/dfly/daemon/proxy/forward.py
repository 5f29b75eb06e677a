"""Forward-proxy decisions, pure: may an absolute-form request go out, and does it go through P2P?

Rules (issue 5):
- The target's origin (scheme://host[:port]) must be in the allowed set, or the request is refused
  (403) before any connection.
- A GET goes through P2P when its URL matches one of `rules` (regexes searched in the whole URL; the
  default `blobs/sha256.*` catches registry layers) or it carries `X-Dragonfly-Use-P2P: true`; requests
  with credentials (`Authorization`, `Cookie`) never do, their content may be private, except registry
  blobs (`/v2/<name>/blobs/sha256:<hex>`) with `Authorization`, which the caller serves only after the
  registry accepted the client's own credentials (as the mirror does).
- Everything else is forwarded directly.
- A P2P download's task leaves out the URL's signing parameters (`ids.DEFAULT_FILTERED_QUERY_PARAMS`)
  and those the client names in `X-Dragonfly-Filtered-Query-Params`; `X-Dragonfly-Tag`,
  `X-Dragonfly-Application` and `X-Dragonfly-Piece-Length` (a size such as `4MiB`, a power of two in
  64 KiB–64 MiB, as dfget's `--piece-length`; anything else is a 400) enter it (`task_keys`).
- Whatever is allowed, an upstream whose name resolves to a link-local or cloud-metadata address is
  refused (`refuse_link_local`), for the forward proxy and the registry mirror alike, and again on the
  addresses the connection is made to (`UpstreamResolver`; the origin reader: `hop_guard`).
- Downloads the proxy starts carry its allowed origins to whichever daemon reads the origin; there
  `hop_guard` applies both rules to the first URL and to every redirect hop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc

from dfly.common.errors import UsageError
from dfly.common.ids import DEFAULT_FILTERED_QUERY_PARAMS, effective_filters
from dfly.common.net import host_port
from dfly.common.pieces import parse_size, validate_user_piece_length
from dfly.daemon.proxy.registry import BadRequest, Forbidden, normalize_upstream
from dfly.daemon.source.http_open import HostGuard

USE_P2P_HEADER = "X-Dragonfly-Use-P2P"
FILTERS_HEADER = "X-Dragonfly-Filtered-Query-Params"
TAG_HEADER = "X-Dragonfly-Tag"
APPLICATION_HEADER = "X-Dragonfly-Application"
PIECE_LENGTH_HEADER = "X-Dragonfly-Piece-Length"
DEFAULT_RULES = ("blobs/sha256.*",)


def compile_rules(rules: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    try:
        return tuple(re.compile(rule) for rule in rules)
    except re.error as exc:
        raise BadRequest(f"invalid proxy rule {exc.pattern!r}: {exc}") from None


def target_origin(url: str, allowed: frozenset[str]) -> str:
    """The scheme://host[:port] of an absolute-form target; Forbidden unless allowed."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unbalanced brackets, NFKC-invalid host names
        raise BadRequest(f"not an absolute http(s) URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequest(f"not an absolute http(s) URL: {url!r}")
    if "@" in parts.netloc:  # RFC 9110 §4.2.4: no userinfo in http(s) URLs; it would be stored with the task
        raise BadRequest("credentials in the URL are not accepted: send them in an Authorization header")
    origin = normalize_upstream(f"{parts.scheme}://{parts.netloc}")
    if origin not in allowed:
        raise Forbidden(f"{origin} is not in proxy.allowed_hosts")
    return origin


def use_p2p(
    method: str,
    url: str,
    headers: Mapping[str, str],
    rules: Sequence[re.Pattern[str]],
    credentials_checked: bool = False,
) -> bool:
    """Does this request go through P2P? With `credentials_checked` (a registry blob, whose
    `Authorization` the caller checks upstream first) an `Authorization` header does not prevent it."""
    if method != "GET" or "Cookie" in headers or ("Authorization" in headers and not credentials_checked):
        return False
    if headers.get(USE_P2P_HEADER, "").strip().lower() == "true":
        return True
    return any(rule.search(url) for rule in rules)


class TaskKeys(NamedTuple):
    """What besides its URL makes a P2P download's task (ids.task_id), as the client's headers set it."""

    tag: str = ""
    application: str = ""
    filtered_query_params: tuple[str, ...] = DEFAULT_FILTERED_QUERY_PARAMS
    piece_length: int | None = None  # user-fixed; None = the daemon's rule


def task_keys(headers: Mapping[str, str]) -> TaskKeys:
    """`X-Dragonfly-Tag`, `X-Dragonfly-Application` and `X-Dragonfly-Piece-Length` (as dfget's `--tag`,
    `--application` and `--piece-length`; BadRequest for an invalid length), and the query parameters
    left out of the task: the defaults (presigned-URL signing parameters) plus the comma-separated names
    in `X-Dragonfly-Filtered-Query-Params`, which extend them as dfget's `--filtered-query-param` does
    (DESIGN.md §3)."""
    piece_length = None
    if (text := headers.get(PIECE_LENGTH_HEADER, "").strip()) != "":
        try:
            piece_length = validate_user_piece_length(parse_size(text))
        except UsageError as exc:
            raise BadRequest(f"{PIECE_LENGTH_HEADER}: {exc}") from None
    return TaskKeys(
        headers.get(TAG_HEADER, "").strip(),
        headers.get(APPLICATION_HEADER, "").strip(),
        effective_filters(headers.get(FILTERS_HEADER, "").split(",")),
        piece_length,
    )


# Link-local (IPv4 169.254/16 includes the 169.254.169.254 metadata service, IPv6 fe80::/10) and the
# cloud metadata addresses outside it (AWS IPv6, Alibaba).
NEVER_UPSTREAM = tuple(
    ipaddress.ip_network(net)
    for net in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)


# IPv6 forms that carry an IPv4 address in their last 32 bits and reach it: IPv4-mapped (the kernel
# connects to the IPv4 address), IPv4-compatible (deprecated) and the NAT64 well-known prefix.
_EMBEDS_IPV4 = tuple(ipaddress.ip_network(net) for net in ("::ffff:0:0/96", "::/96", "64:ff9b::/96"))


def is_loopback(address: str) -> bool:
    """Is this IP address (text, IPv6 zone allowed) loopback, also as an IPv4-mapped IPv6 address?"""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip in _EMBEDS_IPV4[0]:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF).is_loopback
    return ip.is_loopback


def never_upstream(address: str) -> bool:
    """Is this IP address (text, IPv6 zone allowed) link-local or a metadata address, also when written
    as an IPv6 address carrying it (`::ffff:169.254.169.254`, `64:ff9b::a9fe:a9fe`)?"""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and any(ip in net for net in _EMBEDS_IPV4):
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if any(embedded in net for net in NEVER_UPSTREAM):
            return True
    return any(ip in net for net in NEVER_UPSTREAM)


def hop_guard(allowed_origins: Sequence[str], *, refuse_loopback: bool = False) -> HostGuard:
    """The origin reader's check of each hop (first URL and every redirect) of every download: no address
    a connection is made to may be link-local or metadata (an IP literal is refused here already; a name
    is resolved once, by the connection, whose addresses `HostGuard.address_refused` checks), and for a
    download the proxy started, scheme://host[:port] must be one of its allowed origins. Downloads with
    none (dfget, seed triggers) may reach any other host. (A seed reading a metadata URL for anyone
    who asked would hand its own cloud credentials to the whole swarm.) With `refuse_loopback` (a seed
    reading for another host) no loopback address either: that is the seed host's own services."""
    allowed = frozenset(allowed_origins)

    def refused(address: str) -> bool:
        return never_upstream(address) or (refuse_loopback and is_loopback(address))

    def may_contact(scheme: str, host: str, port: int) -> bool:
        netloc = host_port(host, port)
        try:
            if allowed and normalize_upstream(f"{scheme}://{netloc}") not in allowed:
                return False
        except BadRequest:  # not a host this proxy could have allowed
            return False
        try:
            return not refused(host)  # an IP literal
        except ValueError:
            return True  # a name: its addresses are checked when the connection is made

    kind = (
        "a link-local, metadata or loopback address"
        if refuse_loopback
        else "a link-local or metadata address"
    )
    return HostGuard(may_contact, refused, kind)


class UpstreamResolver(aiohttp.abc.AbstractResolver):
    """The proxy's own HTTP client resolves names through this: a name resolving to a link-local or
    metadata address fails the connection, so the address `refuse_link_local` checked cannot be swapped
    for another between the check and the connection (DNS rebinding). IP literals are not resolved;
    `refuse_link_local` has checked them."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if never_upstream(result["host"]):
                raise OSError(f"{host} resolves to {result['host']}, a link-local or metadata address")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def refuse_link_local(origin: str) -> None:
    """Forbidden if the upstream's host resolves to a link-local or metadata address (even when allowed)."""
    parts = urlsplit(origin)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # unresolvable: the connection fails on its own, with the resolver's message
    for *_, sockaddr in infos:
        if never_upstream(str(sockaddr[0])):
            raise Forbidden(f"{host} resolves to {sockaddr[0]}, a link-local or metadata address")
