"""The private-registry check (issue 5): may this client have this blob from the swarm?

Rules:
- Unless the registry is in `proxy.public_registries` (the caller decides), a blob is served from the
  swarm only after a HEAD of it upstream, with the client's own credentials (or none), answered 2xx or
  with a redirect to another origin (the registry's storage, which it gives only an authorized client;
  the redirect is not followed).
- Anything else is the client's answer instead: the registry's 401 with its `WWW-Authenticate` (so
  clients run their token flow), 403 or 404; a redirect within the registry's own origin (an SSO
  gateway's login page) is a 403.
- The HEAD carries dfly's own User-Agent and no other header of the client's.
"""

from __future__ import annotations

from urllib.parse import urljoin

import aiohttp
import yarl
from aiohttp import web

from dfly.common.errors import SourceError, is_out_of_descriptors, out_of_descriptors
from dfly.daemon.proxy.http_edge import error_response
from dfly.daemon.source.http_open import REDIRECT_STATUSES, same_origin

OWN_USER_AGENT = "dfly-daemon"  # requests the proxy makes itself; forwarded ones carry only the client's


def _to_storage(url: str, answer: aiohttp.ClientResponse) -> bool:
    """A redirect whose Location is on another origin than `url` (where registries keep blobs)."""
    location = answer.headers.get("Location")
    if answer.status not in REDIRECT_STATUSES or not location:
        return False
    try:
        return not same_origin(url, urljoin(url, location))
    except ValueError:  # "http://[::1" and the like
        return False


async def check_access(session: aiohttp.ClientSession, url: str, auth: str | None) -> web.Response | None:
    """HEAD the blob upstream with the client's own credentials: None if it may have it (2xx, or a
    redirect to another origin, the registry's storage, which it only gives an authorized client; the
    redirect is not followed), else the registry's answer (401 with its WWW-Authenticate, so the
    client can fetch a token; 403; 404). A redirect within the registry's own origin (a login page
    of an SSO gateway) is a refusal."""
    headers = {"User-Agent": OWN_USER_AGENT} | ({"Authorization": auth} if auth else {})
    try:
        async with session.head(url, headers=headers, allow_redirects=False) as answer:
            if 200 <= answer.status < 300 or _to_storage(url, answer):
                return None
            if 300 <= answer.status < 400:
                return error_response(
                    403, "auth", f"the registry answered {answer.status} within itself for this client",
                    origin_status=answer.status,
                )  # fmt: skip
            kind = {401: "auth", 403: "auth", 404: "not_found"}.get(answer.status, "origin")
            reply = error_response(
                answer.status,
                kind,
                f"the registry answered {answer.status} for this client",
                origin_status=answer.status,
            )
            for name in ("WWW-Authenticate", "Docker-Distribution-Api-Version"):
                if name in answer.headers:
                    reply.headers[name] = answer.headers[name]
            return reply
    except (aiohttp.ClientError, TimeoutError) as exc:
        if is_out_of_descriptors(exc):
            raise out_of_descriptors("checking the client's access upstream") from None
        raise SourceError(f"{yarl.URL(url).origin()} unreachable: {exc}") from None
