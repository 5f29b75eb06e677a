"""The flow model alone: link sharing, completion times, cancel, big-link approximation, capacity."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from dfly.sim.clock import Clock
from dfly.sim.flows import Fairness, Flow, Link, Network


def _net(fairness: Fairness = "maxmin", big_link: int = 32) -> tuple[Clock, Network]:
    clock = Clock()
    return clock, Network(clock, fairness=fairness, big_link=big_link)


class Done(dict[str, float]):
    """Completion times by name."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def on(self, name: str) -> Callable[[Flow], None]:
        def on_done(flow: Flow) -> None:
            self[name] = self.clock.now

        return on_done


@pytest.mark.parametrize("fairness", ["maxmin", "equal"])
def test_two_flows_sharing_an_uplink_get_half_each(fairness: Fairness) -> None:
    clock, net = _net(fairness)
    done = Done(clock)
    up = Link("a.up", 100.0)
    f1 = net.start(up, Link("b.down", 1000.0), 100.0, done.on("b"))
    f2 = net.start(up, Link("c.down", 1000.0), 100.0, done.on("c"))
    assert f1.rate == pytest.approx(50.0)
    assert f2.rate == pytest.approx(50.0)
    clock.run(until=100.0)
    assert done == {"b": pytest.approx(2.0), "c": pytest.approx(2.0)}


def test_two_senders_share_a_downlink() -> None:
    clock, net = _net()
    done = Done(clock)
    down = Link("c.down", 60.0)
    net.start(Link("a.up", 1000.0), down, 30.0, done.on("a"))
    net.start(Link("b.up", 1000.0), down, 90.0, done.on("b"))
    clock.run(until=100.0)
    # 30 each per second until a is done at t=1; then b has 60 left alone at 60/s.
    assert done == {"a": pytest.approx(1.0), "b": pytest.approx(2.0)}


def test_maxmin_gives_what_a_slow_receiver_leaves_to_the_other_flow() -> None:
    _, net = _net("maxmin")
    up = Link("a.up", 100.0)
    slow = net.start(up, Link("slow.down", 20.0), 1e9, lambda f: None)
    fast = net.start(up, Link("fast.down", 1000.0), 1e9, lambda f: None)
    assert slow.rate == pytest.approx(20.0)
    assert fast.rate == pytest.approx(80.0)


def test_equal_share_wastes_what_a_slow_receiver_leaves() -> None:
    _, net = _net("equal")
    up = Link("a.up", 100.0)
    slow = net.start(up, Link("slow.down", 20.0), 1e9, lambda f: None)
    fast = net.start(up, Link("fast.down", 1000.0), 1e9, lambda f: None)
    assert slow.rate == pytest.approx(20.0)
    assert fast.rate == pytest.approx(50.0)


def test_a_finished_flow_hands_its_share_to_the_others() -> None:
    clock, net = _net()
    done = Done(clock)
    up = Link("a.up", 100.0)
    net.start(up, Link("b.down", 1000.0), 50.0, done.on("short"))
    net.start(up, Link("c.down", 1000.0), 150.0, done.on("long"))
    clock.run(until=100.0)
    assert done == {"short": pytest.approx(1.0), "long": pytest.approx(2.0)}


def test_cancel_returns_the_bytes_sent_and_frees_the_link() -> None:
    clock, net = _net()
    done = Done(clock)
    up = Link("a.up", 100.0)
    victim = net.start(up, Link("b.down", 1000.0), 1000.0, done.on("victim"))
    other = net.start(up, Link("c.down", 1000.0), 150.0, done.on("other"))

    def cancel(_: object) -> None:
        done["sent"] = net.cancel(victim)

    clock.at(1.0, cancel)
    clock.run(until=100.0)
    assert done["sent"] == pytest.approx(50.0)
    assert "victim" not in done
    assert other.rate == pytest.approx(100.0)
    assert done["other"] == pytest.approx(2.0)  # 50 in the first second, 100 alone in the next


def test_a_big_link_stays_within_its_drift() -> None:
    clock, net = _net(big_link=8)
    done = Done(clock)
    up = Link("seed.up", 100.0)
    n = 100
    for i in range(n):
        net.start(up, Link(f"c{i}.down", 1000.0), 10.0, done.on(str(i)))
    assert sum(flow.rate for flow in up.flows) <= 100.0 * (1 + net.drift)
    clock.run(until=100.0)
    assert len(done) == n
    # Alone on the link the 100 flows need 1000 bytes / 100 per s = 10 s.
    assert max(done.values()) == pytest.approx(10.0, rel=net.drift)


def test_random_flows_never_overload_a_small_link() -> None:
    rng = random.Random(7)
    clock, net = _net()
    ups = [Link(f"u{i}", rng.uniform(10, 100)) for i in range(6)]
    downs = [Link(f"d{i}", rng.uniform(10, 100)) for i in range(6)]
    links = ups + downs
    finished: list[float] = []

    def check(_: object = None) -> None:
        for link in links:
            assert sum(flow.rate for flow in link.flows) <= link.capacity * (1 + 1e-9)

    def on_done(flow: Flow) -> None:
        finished.append(clock.now)
        check()
        if len(finished) < 200:
            net.start(rng.choice(ups), rng.choice(downs), rng.uniform(1, 50), on_done)
            check()

    for _ in range(12):
        net.start(rng.choice(ups), rng.choice(downs), rng.uniform(1, 50), on_done)
        check()
    clock.run(until=1e6)
    assert len(finished) >= 200
    # Max-min keeps every busy link busy: no flow is left at a rate below what both ends could give it.
    assert net.fills > 0
