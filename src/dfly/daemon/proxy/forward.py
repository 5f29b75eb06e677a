"""Forward-proxy decisions, pure: may an absolute-form request go out, and does it go through P2P?

Rules (issue 5):
- The target's origin (scheme://host[:port]) must be in the allowed set, or the request is refused
  (403) before any connection.
- A GET goes through P2P when its URL matches one of `rules` (regexes searched in the whole URL; the
  default `blobs/sha256.*` catches registry layers) or it carries `X-Dragonfly-Use-P2P: true`; requests
  with credentials (`Authorization`, `Cookie`) never do: their content may be private.
- Everything else is forwarded directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from dfly.daemon.proxy.registry import BadRequest, Forbidden, normalize_upstream

USE_P2P_HEADER = "X-Dragonfly-Use-P2P"
DEFAULT_RULES = ("blobs/sha256.*",)


def compile_rules(rules: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    try:
        return tuple(re.compile(rule) for rule in rules)
    except re.error as exc:
        raise BadRequest(f"invalid proxy rule {exc.pattern!r}: {exc}") from None


def target_origin(url: str, allowed: frozenset[str]) -> str:
    """The scheme://host[:port] of an absolute-form target; Forbidden unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequest(f"not an absolute http(s) URL: {url!r}")
    origin = normalize_upstream(f"{parts.scheme}://{parts.netloc}")
    if origin not in allowed:
        raise Forbidden(f"{origin} is not in proxy.allowed_hosts")
    return origin


def use_p2p(method: str, url: str, headers: Mapping[str, str], rules: Sequence[re.Pattern[str]]) -> bool:
    if method != "GET" or "Authorization" in headers or "Cookie" in headers:
        return False
    if headers.get(USE_P2P_HEADER, "").strip().lower() == "true":
        return True
    return any(rule.search(url) for rule in rules)
