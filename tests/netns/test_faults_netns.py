"""Fault injection on namespaced hosts: a host's daemon SIGKILLed mid-download does not hurt the others.

Job: 6 hosts × 32 MiB at 50 Mbit/s per host (origin and seed at the same rate), all pulling at once
through the real scheduler, seed peer, dfdaemons and dfget. Once host h0's daemon holds about a third
of the file (it is then a parent of others), it is SIGKILLed. Every other host's dfget must succeed with
the origin's sha256, within 3 × T_min, and the origin must still send at most 1.2 copies (the swarm
keeps serving itself, nobody falls back to the origin). Prints the figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dfly.cluster import query_stats

from .testbed import Testbed, t_min_s

HOSTS = 6
FILE_BYTES = 32 * 1024 * 1024
RATE_MBIT = 50.0
VICTIM = 0
TIMEOUT_S = 50.0


def received(socket_path: Path) -> int:
    by_source = query_stats(socket_path, timeout_s=2.0)["download_bytes"]
    return sum(int(v) for source, v in by_source.items() if source != "local_peer")


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_a_host_killed_mid_download_leaves_the_others_finishing_from_the_swarm() -> None:
    with Testbed(hosts=HOSTS, rate_mbit=RATE_MBIT, origin_rate_mbit=RATE_MBIT) as bed:
        url, _ = bed.add_file("blob-32m", FILE_BYTES)
        name = url.rsplit("/", 1)[-1]
        victim = bed.hosts[VICTIM]
        daemon = next(proc for n, proc in bed.procs if n == victim.name)
        clients = {}
        t0 = time.monotonic()
        for i, node in enumerate(bed.hosts):
            (bed.dir / node.name).mkdir(exist_ok=True)
            out = bed.dir / node.name / f"fault-{name}"
            argv = [sys.executable, "-m", "dfly.cli.dfget", "-e", str(node.socket), "--no-progress", url,
                    "-O", str(out)]  # fmt: skip
            clients[i] = (bed.spawn(node, argv, f"dfget-fault-{node.name}"), out)
        assert victim.socket is not None
        while received(victim.socket) < FILE_BYTES // 3:
            assert time.monotonic() - t0 < TIMEOUT_S, "the victim never got a third of the file"
            time.sleep(0.05)
        held = received(victim.socket)
        served = int(query_stats(victim.socket, timeout_s=2.0)["upload_bytes"])
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        killed_at = time.monotonic() - t0

        times = {}
        for i, (proc, out) in clients.items():
            if i == VICTIM:
                proc.wait(timeout=TIMEOUT_S)  # its daemon is gone: it fails, and that is expected
                continue
            rc = proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - t0)))
            assert rc == 0, bed.tail(f"dfget-fault-{bed.hosts[i].name}")
            times[i] = time.monotonic() - t0  # upper bound: clients are reaped in order
            bed.verify([(out, name)])
        copies = bed.origin_bytes() / FILE_BYTES
        others_alive = all(p.poll() is None for n, p in bed.procs if n in {h.name for h in bed.hosts[1:]})
    t_min = t_min_s(FILE_BYTES, HOSTS, RATE_MBIT, RATE_MBIT)
    figures = {
        "hosts": HOSTS,
        "file_bytes": FILE_BYTES,
        "rate_mbit": RATE_MBIT,
        "victim_held_bytes": held,
        "victim_served_bytes": served,
        "killed_at_s": round(killed_at, 3),
        "max_s": round(max(times.values()), 3),
        "t_min_s": round(t_min, 3),
        "max_over_tmin": round(max(times.values()) / t_min, 3),
        "origin_copies": round(copies, 4),
    }
    print(json.dumps(figures))
    assert served > 0, figures  # it was a parent of others when it died
    assert others_alive, figures
    assert max(times.values()) <= 3.0 * t_min, figures
    assert 1.0 <= copies <= 1.2, figures  # at least the one copy every output came from
