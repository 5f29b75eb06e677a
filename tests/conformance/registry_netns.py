"""A network namespace for a test registry, so that it is reached over a link and not over loopback.

`registry_namespace(rate_mbit)` makes a namespace joined to this one by a veth pair (10.213.7.1 here,
10.213.7.2 inside), optionally shaped to `rate_mbit` both ways (HTB, as the swarm testbed), and yields
(address inside, command prefix that runs a program inside). Two users: bench/image_pull.py, for a
registry across a link of a given rate, and the Docker proxy test, because Go clients never send a
request for a loopback address through `HTTP(S)_PROXY`. Names follow the testbed's `dfn<pid hex>x…`
rule, so `netns.cleanup_stale` removes what a killed run left; everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the testbed's plumbing
from netns.netns import kill_namespace, sh, shape

OUTSIDE_ADDRESS = "10.213.7.1"
INSIDE_ADDRESS = "10.213.7.2"


def netns_unusable() -> str:
    """Why this process cannot make a namespace ("" if it can): for a test's skip reason."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"not installed: {', '.join(missing)}" if missing else ""


@contextlib.contextmanager
def registry_namespace(rate_mbit: float = 0.0) -> Iterator[tuple[str, list[str]]]:
    """(registry address, command prefix) of a new namespace behind a veth pair; shaped if rate_mbit."""
    ns, outside, inside = (f"dfn{os.getpid():x}x{k}" for k in ("0reg", "1a", "1b"))
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "addr", "add", f"{OUTSIDE_ADDRESS}/30", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        in_ns = ["ip", "netns", "exec", ns]
        sh(*in_ns, "ip", "addr", "add", f"{INSIDE_ADDRESS}/30", "dev", inside)
        sh(*in_ns, "ip", "link", "set", inside, "up")
        sh(*in_ns, "ip", "link", "set", "lo", "up")
        if rate_mbit:
            shape(["tc"], outside, rate_mbit)
            shape([*in_ns, "tc"], inside, rate_mbit)
        yield INSIDE_ADDRESS, in_ns
    finally:
        kill_namespace(ns)
        sh("ip", "link", "del", outside, check=False)
        sh("ip", "netns", "del", ns, check=False)
