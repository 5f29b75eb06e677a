"""Table-driven tests of each score_* feature and of the ranking."""

from __future__ import annotations

import pytest
from scheduler_testkit import host_info

from dfly.scheduler.core.config import EvaluatorWeights
from dfly.scheduler.core.evaluator import (
    evaluate,
    rank_parents,
    score_bandwidth,
    score_host_type,
    score_idc,
    score_load,
    score_location,
    score_upload_slots,
)
from dfly.scheduler.core.model import Host, Peer, PeerState


def make_host(
    name: str = "h", *, rate: float = 0.0, in_use: int = 0, edges: int = 0, **fields: object
) -> Host:
    host = Host(host_info(name, **fields))  # type: ignore[arg-type]
    host.upload_rate_bytes_per_s = rate
    host.upload_slots_in_use = in_use
    host.child_edges = edges
    return host


@pytest.mark.parametrize(
    ("limit", "rate", "expected"),
    [
        (1000, 0, 1.0),
        (1000, 250, 0.75),
        (1000, 1000, 0.0),
        (1000, 5000, 0.0),  # over the limit is clamped
        (0, 0, 1.0),  # unlimited and idle
        (0, 1.25e9 / 2, 0.5),  # unlimited: compared with 10 Gbit/s
    ],
)
def test_score_bandwidth(limit: int, rate: float, expected: float) -> None:
    host = make_host(rate=rate, upload_limit_bytes_per_s=limit)
    assert score_bandwidth(host) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("slots", "in_use", "edges", "expected"),
    [
        (10, 0, 0, 1.0),
        (10, 5, 0, 0.5),
        (10, 2, 5, 0.5),  # children assigned since the keepalive count too
        (10, 20, 0, 0.0),
        (0, 0, 100, 0.5),  # unreported slots: the daemon default (200)
    ],
)
def test_score_upload_slots(slots: int, in_use: int, edges: int, expected: float) -> None:
    host = make_host(in_use=in_use, edges=edges, upload_slots=slots)
    assert score_upload_slots(host) == pytest.approx(expected)


def test_score_load_combines_bandwidth_and_slots() -> None:
    idle = make_host(upload_limit_bytes_per_s=100, upload_slots=10)
    busy = make_host(rate=100, in_use=10, upload_limit_bytes_per_s=100, upload_slots=10)
    assert score_load(idle) == pytest.approx(1.0)
    assert score_load(busy) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("parent_idc", "child_idc", "expected"),
    [("idc-1", "idc-1", 1.0), ("IDC-1", "idc-1", 1.0), ("idc-1", "idc-2", 0.0), ("", "", 0.0)],
)
def test_score_idc(parent_idc: str, child_idc: str, expected: float) -> None:
    assert score_idc(make_host("p", idc=parent_idc), make_host("c", idc=child_idc)) == expected


@pytest.mark.parametrize(
    ("parent_location", "child_location", "expected"),
    [
        ("cn|zj|hz", "cn|zj|hz", 1.0),
        ("cn|zj|hz", "cn|zj|nb", 0.4),
        ("cn|zj", "us|ca", 0.0),
        ("cn", "cn|zj", 0.2),
        ("a|b|c|d|e|f", "a|b|c|d|e|g", 1.0),  # at most five levels count
        ("", "cn", 0.0),
    ],
)
def test_score_location(parent_location: str, child_location: str, expected: float) -> None:
    parent, child = make_host("p", location=parent_location), make_host("c", location=child_location)
    assert score_location(parent, child) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("seed", "state", "expected"),
    [
        (True, PeerState.BACK_TO_SOURCE, 1.0),
        (True, PeerState.RUNNING, 1.0),
        (True, PeerState.SUCCEEDED, 0.0),
        (False, PeerState.RUNNING, 0.5),
        (False, PeerState.SUCCEEDED, 0.5),
    ],
)
def test_score_host_type(seed: bool, state: PeerState, expected: float) -> None:
    peer = Peer("p", "t", "h", state=state)
    assert score_host_type(peer, make_host(seed=seed)) == expected


def test_weights_are_named_and_default_to_dragonfly() -> None:
    weights = EvaluatorWeights()
    assert (weights.load, weights.idc, weights.location, weights.host_type) == (0.6, 0.2, 0.1, 0.1)
    perfect = make_host("p", seed=True, idc="x", location="a|b")
    child = make_host("c", idc="x", location="a|b")
    assert evaluate(Peer("p", "t", "h", state=PeerState.RUNNING), perfect, child, weights) == pytest.approx(
        1.0
    )


CHILD = make_host("child", idc="idc-1", location="cn|zj|hz")


@pytest.mark.parametrize(
    ("case", "better", "worse"),
    [
        ("less loaded", make_host("x", upload_slots=10), make_host("y", in_use=9, upload_slots=10)),
        ("same idc", make_host("x", idc="idc-1"), make_host("y", idc="idc-2")),
        ("closer location", make_host("x", location="cn|zj|nb"), make_host("y", location="us")),
        ("running seed", make_host("x", seed=True), make_host("y")),
    ],
)
def test_rank_prefers(case: str, better: Host, worse: Host) -> None:
    better_peer = Peer("better", "t", better.host_id, state=PeerState.RUNNING)
    worse_peer = Peer("worse", "t", worse.host_id, state=PeerState.RUNNING)
    ranked = rank_parents([(worse_peer, worse), (better_peer, better)], CHILD, EvaluatorWeights())
    assert [peer.peer_id for peer, _ in ranked] == ["better", "worse"], case


def test_rank_keeps_sampled_order_on_ties() -> None:
    hosts = [make_host(f"h{i}") for i in range(4)]
    peers = [
        (Peer(f"p{i}", "t", host.host_id, state=PeerState.RUNNING), host) for i, host in enumerate(hosts)
    ]
    ranked = rank_parents(peers, CHILD, EvaluatorWeights())
    assert [peer.peer_id for peer, _ in ranked] == ["p0", "p1", "p2", "p3"]
