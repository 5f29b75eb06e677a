"""Identifiers: host ids, peer ids, canonical URLs and task ids (DESIGN.md §3).

Rules:
- host_id = "{advertise_ip}-{hostname}"; peer_id = "{host_id}-{random hex}" (the randomness is the
  caller's: ids are built from what is passed in).
- canonical_url: scheme and host lower case, default port and fragment dropped, path as sent (an empty
  path becomes "/"), query parameters whose key is filtered removed, the rest sorted by key (stable
  within a key, raw encoding kept).
- task_id = sha256 over canonical URL, tag, application and the user-fixed piece length (NUL-separated).
  Every entry point (dfget, proxy, mirror, preheat, scheduler) calls `task_id` and nothing else.
- redact_url is the only form of a URL that goes into a log line or an error message: no credentials,
  no query string (presigned URLs carry their tokens there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NewType
from urllib.parse import unquote, urlsplit, urlunsplit

from dfly.common.errors import UsageError

TaskId = NewType("TaskId", str)
HostId = NewType("HostId", str)
PeerId = NewType("PeerId", str)

# Presigned-URL signing parameters of S3, GCS, OSS, OBS and COS, and containerd's `ns`: they change
# per request but not the object, so they never split a task.
DEFAULT_FILTERED_QUERY_PARAMS: tuple[str, ...] = (
    # S3
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
    "X-Amz-Signature", "X-Amz-Security-Token", "X-Amz-User-Agent",
    # GCS
    "X-Goog-Algorithm", "X-Goog-Credential", "X-Goog-Date", "X-Goog-Expires", "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    # OSS
    "OSSAccessKeyId", "Expires", "Signature", "SecurityToken",
    # OBS
    "AccessKeyId", "X-Obs-Date", "X-Obs-Security-Token",
    # COS
    "q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list", "q-url-param-list",
    "q-signature", "x-cos-security-token",
    # containerd mirror namespace
    "ns",
)  # fmt: skip

_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_id(advertise_ip: str, hostname: str) -> HostId:
    return HostId(f"{advertise_ip}-{hostname}")


def peer_id(host: HostId, nonce_hex: str) -> PeerId:
    return PeerId(f"{host}-{nonce_hex}")


def effective_filters(
    user_filters: Iterable[str] = (), *, no_default_filters: bool = False
) -> tuple[str, ...]:
    """The filter list in force: user filters extend the defaults unless the defaults are turned off."""
    base: tuple[str, ...] = () if no_default_filters else DEFAULT_FILTERED_QUERY_PARAMS
    seen = set(base)
    extra = []
    for name in user_filters:
        name = name.strip()
        if name and name not in seen:
            seen.add(name)
            extra.append(name)
    return base + tuple(extra)


def ascii_host(host: str) -> str:
    """`host` as a resolver takes it: an IP literal or ASCII name as it is, an internationalized name in
    its IDNA form. ValueError for a name nothing resolves (an empty label as in `a..b`, a label over 63
    characters), which http.client would raise as UnicodeError from the middle of a request."""
    if ":" in host:  # an IPv6 literal
        return host
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("a label of the name is empty or over 63 characters") from None
    return host if host.isascii() else encoded


def canonical_url(url: str, filtered_query_params: Iterable[str] = DEFAULT_FILTERED_QUERY_PARAMS) -> str:
    """The URL form every task id is computed from; raises UsageError for a URL that cannot be fetched."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid URL {redact_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:  # "host/file", "notaurl": shown as typed, without a query (it may hold a token)
        shown = url.partition("?")[0] + ("?…" if "?" in url else "")
        raise UsageError(f"{shown!r} is not a URL: expected http(s)://host/…")
    if scheme not in _DEFAULT_PORTS:
        shown = redact_url(url)
        raise UsageError(f"unsupported URL scheme {parts.scheme!r} in {shown!r} (use http or https)")
    hostname = (parts.hostname or "").lower()
    if not hostname:
        raise UsageError(f"URL has no host: {redact_url(url)!r}")
    try:
        ascii_host(hostname)
    except ValueError as exc:
        raise UsageError(f"invalid host name in URL {redact_url(url)!r}: {exc}") from None
    if ":" in hostname:  # IPv6 literal
        hostname = f"[{hostname}]"
    netloc = hostname if port is None or port == _DEFAULT_PORTS[scheme] else f"{hostname}:{port}"
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{userinfo}@{netloc}"
    filtered = set(filtered_query_params)
    kept: list[tuple[str, str]] = []
    for item in parts.query.split("&"):
        if not item:
            continue
        key = unquote(item.split("=", 1)[0])
        if key not in filtered:
            kept.append((key, item))
    kept.sort(key=lambda pair: pair[0])  # sorted() is stable: equal keys keep their order
    query = "&".join(item for _, item in kept)
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def task_id(
    url: str,
    *,
    tag: str = "",
    application: str = "",
    piece_length: int | None = None,
    filtered_query_params: Iterable[str] = DEFAULT_FILTERED_QUERY_PARAMS,
) -> TaskId:
    """sha256 hex of (canonical URL, tag, application, user-fixed piece length)."""
    fields = [
        canonical_url(url, filtered_query_params),
        tag,
        application,
        str(piece_length) if piece_length else "",
        "STANDARD",
    ]
    from hashlib import sha256  # here, not at the top: loading libcrypto is ~8 ms of every dfget start

    return TaskId(sha256("\0".join(fields).encode()).hexdigest())


def redact_url(url: str) -> str:
    """The URL without credentials and query string, for messages and logs; characters that are not
    printable (control characters, terminal escapes, NUL, bidi overrides) are shown escaped (`\\x1b`),
    since anyone who may use the local API or the proxy chooses what is logged here."""
    return printable(_redacted(url))


def printable(text: str) -> str:
    """`text` with each character that is not printable written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _redacted(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # an invalid port or bracketed host: cut by hand
        scheme, sep, rest = url.partition("://")
        before_query, query_mark, _ = rest.partition("?")
        netloc, slash, path = before_query.partition("/")
        tail = "?…" if query_mark else ""
        return f"{scheme}{sep}{netloc.rsplit('@', 1)[-1]}{slash}{path}{tail}"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")
