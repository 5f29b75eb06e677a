"""Ranking of candidate parents: a weighted sum of named feature scores, each in [0, 1], higher better.

total = w.load·score_load + w.idc·score_idc + w.location·score_location + w.host_type·score_host_type
(Dragonfly's weights 0.6 / 0.2 / 0.1 / 0.1 by default, see EvaluatorWeights). Load comes from what the
host reports on its keepalive (observed upload throughput and upload slots in use) plus the children
this scheduler has pointed at it since, so a burst of registers spreads before the next keepalive.
Pure functions: nothing here reads a clock or draws random numbers (ties keep the sampled order).
"""

from __future__ import annotations

from collections.abc import Sequence

from dfly.scheduler.core.config import EvaluatorWeights
from dfly.scheduler.core.model import Host, Peer, PeerState

# An upload limit of 0 means "unlimited": compare throughput with a 10 Gbit/s link instead.
UNLIMITED_UPLOAD_BYTES_PER_S = 1.25e9
# A host that did not report its slots is treated as having the daemon's default.
ASSUMED_UPLOAD_SLOTS = 200
# How the load score splits between bandwidth headroom and free upload slots.
BANDWIDTH_SHARE = 0.6
SLOTS_SHARE = 0.4
# Location is a "|"-separated hierarchy (country|province|city|zone|cluster); at most this many levels.
MAX_LOCATION_LEVELS = 5
_ACTIVE_SEED_STATES = frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE})


def _clamp(value: float) -> float:
    return max(0.0, min(1.0, value))


def score_bandwidth(host: Host) -> float:
    """1 − observed upload throughput / upload limit, in [0, 1]; an idle host scores 1."""
    capacity = host.info.upload_limit_bytes_per_s or UNLIMITED_UPLOAD_BYTES_PER_S
    return _clamp(1.0 - host.upload_rate_bytes_per_s / capacity)


def score_upload_slots(host: Host) -> float:
    """Share of upload slots free, in [0, 1]; in use = max(reported, children assigned here)."""
    slots = host.info.upload_slots if host.info.upload_slots > 0 else ASSUMED_UPLOAD_SLOTS
    in_use = max(host.upload_slots_in_use, host.child_edges)
    return _clamp(1.0 - in_use / slots)


def score_load(host: Host) -> float:
    """Load quality in [0, 1]: bandwidth headroom and free slots, BANDWIDTH_SHARE / SLOTS_SHARE."""
    return BANDWIDTH_SHARE * score_bandwidth(host) + SLOTS_SHARE * score_upload_slots(host)


def score_idc(parent: Host, child: Host) -> float:
    """1 when both hosts name the same (non-empty, case-insensitive) IDC, else 0."""
    parent_idc = parent.info.idc.strip().lower()
    return 1.0 if parent_idc and parent_idc == child.info.idc.strip().lower() else 0.0


def score_location(parent: Host, child: Host) -> float:
    """Matching leading levels of the `|` hierarchy / 5, in [0, 1]; identical non-empty strings 1."""
    parent_location, child_location = parent.info.location.strip(), child.info.location.strip()
    if not parent_location or not child_location:
        return 0.0
    if parent_location.lower() == child_location.lower():
        return 1.0
    matched = 0
    for mine, theirs in zip(
        parent_location.lower().split("|")[:MAX_LOCATION_LEVELS],
        child_location.lower().split("|")[:MAX_LOCATION_LEVELS],
        strict=False,
    ):
        if mine != theirs:
            break
        matched += 1
    return matched / MAX_LOCATION_LEVELS


def score_host_type(parent: Peer, parent_host: Host) -> float:
    """Seed peer still downloading → 1 (prefer it on a first download), other seed → 0, normal → 0.5."""
    if not parent_host.info.seed:
        return 0.5
    return 1.0 if parent.state in _ACTIVE_SEED_STATES else 0.0


def evaluate(parent: Peer, parent_host: Host, child_host: Host, weights: EvaluatorWeights) -> float:
    """The parent's score for this child, in [0, 1] when the weights sum to 1."""
    return (
        weights.load * score_load(parent_host)
        + weights.idc * score_idc(parent_host, child_host)
        + weights.location * score_location(parent_host, child_host)
        + weights.host_type * score_host_type(parent, parent_host)
    )


def rank_parents(
    candidates: Sequence[tuple[Peer, Host]], child_host: Host, weights: EvaluatorWeights
) -> list[tuple[Peer, Host]]:
    """Candidates best first; equal scores keep their (randomly sampled) order."""
    scored = [
        (evaluate(peer, host, child_host, weights), index) for index, (peer, host) in enumerate(candidates)
    ]
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [candidates[index] for _, index in scored]
