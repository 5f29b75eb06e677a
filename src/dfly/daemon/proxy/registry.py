"""Registry-mirror routing, pure: what a request is, which upstream it goes to, and the blob's URL.

Rules (issue 5, reference/container-clients.md):
- `GET|HEAD /v2/` (skopeo and podman ping it before using a mirror) is passed to the upstream, so a
  registry's auth challenge reaches the client before its first real request; with no upstream known
  the mirror answers 200 itself.
- `GET /v2/<name>/blobs/sha256:<64 hex>` is a blob: served through P2P, one task per canonical upstream
  URL, so the same layer pulled by different hosts is one task. Everything else (manifests, tags, HEAD,
  uploads) is passed through to the upstream.
- The upstream comes from the `X-Dragonfly-Registry` header, else containerd's `ns=` query parameter
  (a host[:port], plain HTTP only when it is a loopback or listed as such), else the configured default
  (`proxy.registry_mirror`). It must be one of `allowed` (scheme://host[:port]); anything else is
  refused before any connection is made. `docker.io` (what containerd sends as `ns` for Docker Hub
  images) means `registry-1.docker.io`, the host that serves Docker Hub's API, as for containerd and
  Docker themselves: so containerd's and dockerd's pulls of one layer are one task.
- Repository names follow the distribution grammar (lower-case path components); anything that could
  leave `/v2/` (`..`, empty components, `%2f`) is refused.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from dfly.common.errors import DflyError

# a reference's host, or another name of Docker Hub's API (Dragonfly's default mirror is
# https://index.docker.io), -> the API host containerd uses: one task per layer whichever name is given
DOCKER_HUB_API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_BLOB = re.compile(rf"/v2/(?P<name>{_NAME})/blobs/(?P<digest>sha256:[a-f0-9]{{64}})")


class Forbidden(DflyError):
    """The request names an upstream the mirror may not contact (HTTP 403)."""


class BadRequest(DflyError):
    """Not a registry request this mirror can make sense of (HTTP 400)."""


@dataclass(frozen=True)
class Route:
    kind: str  # "ping" | "blob" | "pass"
    name: str = ""  # repository
    digest: str = ""  # blobs: "sha256:<hex>"


def registry_blob(method: str, path: str) -> Route | None:
    """The blob a GET of an absolute URL's path names (forward proxy, interception), else None."""
    blob = _BLOB.fullmatch(path) if method == "GET" else None
    return Route("blob", blob["name"], blob["digest"]) if blob else None


def route(method: str, path: str) -> Route:
    """Classify an origin-form request path (without its query)."""
    if path in ("/v2", "/v2/") and method in ("GET", "HEAD"):
        return Route("ping")
    if "%" in path or "//" in path or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise BadRequest(f"invalid registry path {path!r}")
    if method == "GET" and (blob := _BLOB.fullmatch(path)):
        return Route("blob", blob["name"], blob["digest"])
    if path.startswith("/v2/"):
        return Route("pass")
    raise BadRequest(f"not a registry API path: {path!r}")


_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?", re.ASCII
)


def _valid_host(hostname: str) -> bool:
    """An IP address, or a DNS name (IDNA names in their ASCII form) of letters, digits, '-' and '_'."""
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        pass
    try:
        ascii_name = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _HOST_NAME.fullmatch(ascii_name.lower()) is not None


def _clipped(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…"


def normalize_upstream(value: str) -> str:
    """'http://h:p', 'https://h', 'h:p' -> 'scheme://host[:port]' (no path, no default port, host names
    in their IDNA ASCII form); BadRequest if not one."""
    text = value.strip()
    if "://" not in text:
        host = text.rstrip("/").rsplit(":", 1)[0].strip("[]")
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        text = f"{'http' if loopback else 'https'}://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # "[" / "http://[::1" (brackets), NFKC-invalid netlocs, bad ports
        raise BadRequest(f"invalid registry {value!r}") from None
    scheme_ok = parts.scheme.lower() in ("http", "https")
    if not scheme_ok or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise BadRequest(f"invalid registry {value!r}")
    if not _valid_host(parts.hostname):  # "not a url", "*": a name no connection could reach
        raise BadRequest(f"invalid registry {_clipped(value)!r}: not a host name or address")
    if parts.username is not None or parts.password is not None:  # never used: a 401 without a hint
        raise BadRequest("credentials in a registry URL are not accepted: send an Authorization header")
    scheme = parts.scheme.lower()
    name = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
    host = f"[{name}]" if ":" in name else name
    host = DOCKER_HUB_API_HOSTS.get(host, host)
    default_port = 443 if scheme == "https" else 80
    return f"{scheme}://{host}{f':{port}' if port and port != default_port else ''}"


def choose_upstream(header: str | None, ns: str | None, default: str, allowed: frozenset[str]) -> str:
    """The upstream registry for a request (module rules); Forbidden unless it is allowed."""
    given = header or (unquote(ns) if ns else None) or default
    if not given:
        raise BadRequest("no upstream registry: send X-Dragonfly-Registry or configure proxy.registry_mirror")
    upstream = normalize_upstream(given)
    if upstream not in allowed and "://" not in given:  # a bare host[:port] (ns=): plain HTTP if so listed
        plain = "http://" + upstream.split("://", 1)[1]
        upstream = plain if plain in allowed else upstream
    if upstream not in allowed:
        raise Forbidden(f"registry {upstream} is not in proxy.allowed_hosts")
    return upstream


def blob_url(upstream: str, name: str, digest: str) -> str:
    """The canonical upstream URL of a blob: the task id of its P2P download derives from it."""
    return f"{upstream}/v2/{name}/blobs/{digest}"
