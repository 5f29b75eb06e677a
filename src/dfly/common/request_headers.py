"""Request headers the daemon never passes to an origin, shared by the daemon and dfget.

The daemon fetches whole objects from the host in their URL, and sets ranges, conditional requests,
the encoding and the connection itself; a client's own headers of those kinds are dropped (the
daemon) or refused with a usage error (dfget, so a `-H 'Range: …'` never silently downloads the whole
object). Standard library only: dfget imports it.
"""

from __future__ import annotations

HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"})
_SET_BY_DAEMON = frozenset({"range", "host", "accept-encoding", "content-length"})


def set_by_daemon(name: str) -> bool:
    """Whether a request header of this name is the daemon's own (never forwarded from a client)."""
    low = name.lower()
    return low in HOP_BY_HOP_HEADERS or low in _SET_BY_DAEMON or low.startswith(("proxy-", "if-"))
