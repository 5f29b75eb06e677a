"""The address a daemon advertises (its host id) when `host.advertise_ip` is not set, in a namespace whose
routes the test sets: toward the scheduler if it can be reached, else toward the default route (a
scheduler whose DNS name is not published yet at start gave a silent 127.0.0.1, and children on other
hosts then dialled themselves), 127.0.0.1 only where there is no route at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import sh

HOST_IP = "10.213.7.2"
PROBE = (
    "from dfly.daemon.scheduler_client import source_ip_toward as s; import sys; "
    "print(s(sys.argv[1], ipv4_only=sys.argv[2:] == ['ipv4']))"
)


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"dfn{os.getpid():x}x7-srcip"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def advertised(namespace: str, scheduler: str, *flags: str) -> tuple[str, str]:
    proc = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE, scheduler, *flags],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return proc.stdout.strip(), proc.stderr


def with_default_route(namespace: str) -> None:
    sh("ip", "-n", namespace, "link", "add", "srcip0", "type", "veth", "peer", "name", "srcip1")
    sh("ip", "-n", namespace, "addr", "add", f"{HOST_IP}/24", "dev", "srcip0")
    for dev in ("srcip0", "srcip1"):
        sh("ip", "-n", namespace, "link", "set", dev, "up")
    sh("ip", "-n", namespace, "route", "add", "default", "via", "10.213.7.1")


def test_the_address_toward_a_reachable_scheduler(namespace: str) -> None:
    with_default_route(namespace)
    assert advertised(namespace, "10.213.7.9:8002")[0] == HOST_IP
    assert advertised(namespace, "127.0.0.1:8002")[0] == "127.0.0.1"


def test_a_name_with_ipv4_and_ipv6_addresses_gives_the_ipv4_source(namespace: str) -> None:
    """The piece server listens on 0.0.0.0 (IPv4) by default: a scheduler name resolving to both families
    (as `localhost` does) must not make the host advertise an IPv6 address its children cannot dial."""
    with_default_route(namespace)
    sh("ip", "-n", namespace, "addr", "add", "2001:db8:7::2/64", "dev", "srcip0", "nodad")
    sh("ip", "-n", namespace, "route", "add", "default", "via", "2001:db8:7::1", "dev", "srcip0")
    hosts = Path("/etc/netns") / namespace / "hosts"  # `ip netns exec` mounts it over /etc/hosts
    hosts.parent.mkdir(parents=True)
    try:
        hosts.write_text("2001:db8:7::9 sched.test\n10.213.7.9 sched.test\n")
        assert advertised(namespace, "sched.test:8002")[0] == HOST_IP
        assert advertised(namespace, "[2001:db8:7::9]:8002")[0] == "2001:db8:7::2"
        # a piece server on an IPv4 address: an IPv6-only scheduler still gives the IPv4 address
        ip, log = advertised(namespace, "[2001:db8:7::9]:8002", "ipv4")
        assert ip == HOST_IP
        assert "no IPv4 route to scheduler [2001:db8:7::9]:8002 now" in log
    finally:
        shutil.rmtree(hosts.parent, ignore_errors=True)


def test_an_unreachable_scheduler_gives_the_default_routes_address(namespace: str) -> None:
    with_default_route(namespace)
    ip, log = advertised(namespace, "[fd00::1]:8002")  # no IPv6 route in the namespace
    assert ip == HOST_IP
    assert "no route to scheduler [fd00::1]:8002 now; advertising 10.213.7.2" in log


def test_no_route_at_all_gives_loopback_and_says_so(namespace: str) -> None:
    ip, log = advertised(namespace, "10.213.7.9:8002")
    assert ip == "127.0.0.1"
    assert "nor any default route; advertising 127.0.0.1" in log
