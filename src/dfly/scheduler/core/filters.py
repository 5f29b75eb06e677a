"""Candidate-parent filters: a chain of named rejections, each a pure predicate (True = drop).

Order matters only for the reason reported: self, same host, blocked, bad state, slow (piece-cost
outlier), suspended host, leech, unready, cycle. `rejection_reason` returns the first filter's name
that drops a candidate, or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dfly.scheduler.core.graph import would_create_cycle
from dfly.scheduler.core.model import Host, Peer, PeerState

BAD_PARENT_STATES = frozenset({PeerState.PENDING, PeerState.RECEIVED, PeerState.FAILED, PeerState.LEAVE})


@dataclass(frozen=True, slots=True)
class FilterContext:
    child: Peer
    child_host: Host
    now: float
    dag: bool  # topology "dag": refuse edges that could close a cycle


Rejection = Callable[[FilterContext, Peer, Host], bool]


def is_self(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """A peer never downloads from itself."""
    return candidate.peer_id == ctx.child.peer_id


def is_same_host(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """Nor from another peer of its own host (it would read its own disk through the network)."""
    return candidate.host_id == ctx.child.host_id


def is_blocked(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """The child reported this parent as failing it (reschedule blocked/unreachable list)."""
    return candidate.peer_id in ctx.child.blocked


def is_bad(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """Not yet started (PENDING, RECEIVED) or ended without the data (FAILED, LEAVE)."""
    return candidate.state in BAD_PARENT_STATES


def is_slow(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """The last piece it served took far longer than its history (core/costs.py); seeds and origin
    readers are exempt (their costs include the queueing of every child waiting on the source)."""
    costs = candidate.served_costs
    if costs is None or not costs.bad or host.info.seed or candidate.reads_origin:
        return False
    return candidate.state is not PeerState.BACK_TO_SOURCE


def is_suspended(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """The host's keepalive dropped, or children reported it unreachable."""
    return host.is_suspended(ctx.now)


def is_leech(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """The host serves no pieces (no piece port)."""
    return host.info.piece_port <= 0


def is_unready(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """A normal peer with nothing to give yet: no finished piece, not reading the origin, not done."""
    if host.info.seed or candidate.state in (PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED):
        return False
    return candidate.finished_piece_count == 0


def is_cycle(ctx: FilterContext, candidate: Peer, host: Host) -> bool:
    """dag topology only: the edge candidate → child could close a cycle."""
    return ctx.dag and would_create_cycle(ctx.child, candidate)


FILTERS: tuple[tuple[str, Rejection], ...] = (
    ("self", is_self),
    ("same_host", is_same_host),
    ("blocked", is_blocked),
    ("bad", is_bad),
    ("slow", is_slow),
    ("suspended", is_suspended),
    ("leech", is_leech),
    ("unready", is_unready),
    ("cycle", is_cycle),
)


def rejection_reason(ctx: FilterContext, candidate: Peer, host: Host) -> str | None:
    for name, rejects in FILTERS:
        if rejects(ctx, candidate, host):
            return name
    return None
