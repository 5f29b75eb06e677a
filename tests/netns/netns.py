"""Linux network-namespace plumbing for the testbed: nodes, bridge, shaping, short commands, cleanup.

Rules: every name the testbed creates matches `dfn<pid hex>x<seq>…` (`cleanup_stale` removes only
names whose owning pid is gone); shaping is HTB with one class (rate = ceil, burst ≥ 128 KiB, see
testbed-notes) and a bfifo leaf of ~QUEUE_S seconds (HTB's default 1000-packet leaf of 64 KiB GSO
packets held seconds of data and slowed a seed's origin read to 6 s); `netem_missing` probes sch_netem
on `lo` of a throwaway namespace (this project's kernels have none, see testbed-notes).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAYLOAD_FRACTION = 1448 / 1514
BURST = "256k"  # >= 128 KiB, or the shaper splits veth's 64 KiB GSO packets (CPU x3)
QUEUE_S = 0.020
QUEUE_MIN_BYTES = 256 * 1024
_PREFIX_RE = re.compile(r"^dfn([0-9a-f]+)x\d")


class TestbedError(RuntimeError):
    """The testbed could not be built, a member failed, or a download was wrong."""


@dataclass
class Node:
    """One namespace: its name, IP, veth ends (`veth_ns` inside, `veth_br` on the bridge) and cap."""

    name: str
    ns: str
    ip: str
    veth_ns: str
    veth_br: str
    rate_mbit: float | None
    ready: dict[str, Any] | None = None  # the scheduler's ready file
    socket: Path | None = None  # a daemon's local API socket


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


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)


def netem_missing(prefix: str) -> str:
    """Why `tc ... netem` cannot be used here ("" if it can): tried on `lo` of namespace PREFIX-netem."""
    ns = f"{prefix}-netem"
    sh("ip", "netns", "add", ns)
    try:
        probe = sh("tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        return "" if probe.returncode == 0 else probe.stderr.strip() or f"tc exited {probe.returncode}"
    finally:
        sh("ip", "netns", "del", ns, check=False)


def process_cpu_s(pids: Sequence[int]) -> float:
    """utime + stime of live processes (all their threads, not their children), from /proc/PID/stat."""
    return sum(process_cpu_split_s(pids))


def process_cpu_split_s(pids: Sequence[int]) -> tuple[float, float]:
    """(utime, stime) of live processes (all their threads, not their children), from /proc/PID/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / ticks
        system += int(fields[12]) / ticks
    return user, system


def build_network(bridge: str, nodes: Sequence[Node], probe: Node) -> bool:
    """The bridge, one namespace + veth pair per node, the caps; returns whether netem works on `probe`."""
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "link", "set", bridge, "up")
    for node in nodes:
        ns, a, b = node.ns, node.veth_ns, node.veth_br
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", b, "type", "veth", "peer", "name", a, "netns", ns)
        sh("ip", "link", "set", b, "master", bridge, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{node.ip}/16", "dev", a)
        sh("ip", "-n", ns, "link", "set", a, "up")
    netem = ("tc", "qdisc", "add", "dev", probe.veth_br, "root", "netem", "delay", "1ms")
    has_netem = sh(*netem, check=False).returncode == 0  # `probe` (the scheduler) stays uncapped
    if has_netem:
        sh("tc", "qdisc", "del", "dev", probe.veth_br, "root")
    for node in nodes:
        if node.rate_mbit is not None:
            shape(["tc"], node.veth_br, node.rate_mbit)
            shape(["tc", "-n", node.ns], node.veth_ns, node.rate_mbit)
    return has_netem


def drop_data(root: Path, min_bytes: int = 1 << 20) -> None:
    """Delete the regular files under `root` of at least `min_bytes` but logs (`*.log`): keep the clues."""
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            big = path.is_file() and not path.is_symlink() and path.stat().st_size >= min_bytes
            if big and path.suffix != ".log":
                path.unlink()
