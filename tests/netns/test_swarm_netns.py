"""A dfly swarm on namespaced hosts with capped links finishes near the bound and reads the origin once.

Job: 6 hosts × 16 MiB at 100 Mbit/s per host (origin and seed at the same rate) through the real
scheduler, seed peer, dfdaemons and dfget, in network namespaces built by `testbed.Testbed`.
Rules: every daemon is ready before the clock starts; a host's time is its dfget's exit minus t0 (just
before the first client starts); every output's sha256 equals the origin file's; asserts max ≤ 2.5 ×
T_min (TCP payload rate) and 1 ≤ origin copies ≤ 1.2; prints the figures as one JSON line.
"""

from __future__ import annotations

import json
import time

import pytest

from .testbed import Testbed, percentile, t_min_s

HOSTS = 6
FILE_BYTES = 16 * 1024 * 1024
RATE_MBIT = 100.0


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_six_hosts_pull_16mib_near_the_bound_with_one_origin_copy() -> None:
    started = time.monotonic()
    with Testbed(hosts=HOSTS, rate_mbit=RATE_MBIT, origin_rate_mbit=RATE_MBIT) as bed:
        url, _ = bed.add_file("blob-16m", FILE_BYTES)
        times = bed.run_dfget(None, url)  # raises on a failed client or a wrong sha256
        bed.check_alive()
        copies = bed.origin_bytes() / FILE_BYTES
        origin = "nginx" if bed.use_nginx else "dfly.devtools.origin"
    t_min = t_min_s(FILE_BYTES, HOSTS, RATE_MBIT, RATE_MBIT)
    figures = {
        "system": "dfly",
        "hosts": HOSTS,
        "file_bytes": FILE_BYTES,
        "rate_mbit": RATE_MBIT,
        "origin_rate_mbit": RATE_MBIT,
        "origin": origin,
        "p50_s": round(percentile(times, 50), 3),
        "p95_s": round(percentile(times, 95), 3),
        "max_s": round(max(times), 3),
        "t_min_s": round(t_min, 3),
        "p95_over_tmin": round(percentile(times, 95) / t_min, 3),
        "max_over_tmin": round(max(times) / t_min, 3),
        "origin_copies": round(copies, 4),
        "sha_ok": True,
        "wall_s": round(time.monotonic() - started, 2),
    }
    print(json.dumps(figures))
    assert max(times) <= 2.5 * t_min, figures
    assert 1.0 <= copies <= 1.2, figures  # at least the one copy every output came from
