"""Linux network-namespace plumbing for the testbed: short commands, shaping, reaping, stale cleanup.

Rules: every name the testbed creates matches `dfn<pid hex>x<seq>…` (`cleanup_stale` removes only
names whose owning pid is gone); shaping is HTB with one class (rate = ceil, burst ≥ 128 KiB, see
testbed-notes) and a bfifo leaf of ~QUEUE_S seconds (HTB's default 1000-packet leaf of 64 KiB GSO
packets held seconds of data and slowed a seed's origin read to 6 s); children are reaped by pidfd.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Sequence

PAYLOAD_FRACTION = 1448 / 1514
BURST = "256k"  # >= 128 KiB, or the shaper splits veth's 64 KiB GSO packets (CPU x3)
QUEUE_S = 0.020
QUEUE_MIN_BYTES = 256 * 1024
_PREFIX_RE = re.compile(r"^dfn([0-9a-f]+)x\d")


class TestbedError(RuntimeError):
    """The testbed could not be built, a member failed, or a download was wrong."""


def payload_bytes_per_s(rate_mbit: float) -> float:
    """TCP payload bytes per second on a link shaped at `rate_mbit` (wire rate × 1448/1514)."""
    return rate_mbit * 1e6 / 8 * PAYLOAD_FRACTION


def clean_env() -> dict[str, str]:
    """This process's environment without any `*_proxy` variable."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command (ip, tc) and capture its output; raise TestbedError on failure if check."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def kill_namespace(ns: str) -> None:
    """SIGKILL every process in namespace `ns` (`ip netns pids`)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Remove namespaces and links of earlier testbeds whose owning process is gone; returns names."""
    netns = [line.split(" ", 1)[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines()]
    links = re.findall(r"^\d+: ([^:@]+)", sh("ip", "-o", "link", "show", check=False).stdout, re.M)
    stale = [
        n
        for n in netns + links
        if (m := _PREFIX_RE.match(n)) and not os.path.exists(f"/proc/{int(m.group(1), 16)}")
    ]
    for name in stale:
        if name in netns:
            kill_namespace(name)
        sh("ip", "netns" if name in netns else "link", "del", name, check=False)
    return stale


def shape(tc: list[str], dev: str, rate_mbit: float) -> None:
    """HTB root, one class with rate = ceil and a 256 KiB burst, a bfifo leaf of ~QUEUE_S seconds."""
    rate = f"{rate_mbit * 1000:.0f}kbit"
    limit = max(QUEUE_MIN_BYTES, int(payload_bytes_per_s(rate_mbit) * QUEUE_S))
    sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
    sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate,
       "burst", BURST, "cburst", BURST)  # fmt: skip
    sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "bfifo", "limit", str(limit))


def wait_exits(procs: Sequence[subprocess.Popen[bytes]], deadline: float) -> list[float | None]:
    """Reap every process as it exits (pidfd + poll): its exit time, None if killed at the deadline."""
    ends: list[float | None] = [None] * len(procs)
    fds = {os.pidfd_open(proc.pid): k for k, proc in enumerate(procs)}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        while None in ends and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                ends[fds[fd]] = time.monotonic()
                procs[fds[fd]].wait()
                poller.unregister(fd)
    finally:
        for fd in fds:
            os.close(fd)
        for proc in procs:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
    return ends


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
