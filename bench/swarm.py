"""Swarm benchmark on namespaced hosts with capped links (issue 3): one JSON line per system.

`bench/swarm.py --hosts N --file-mib F --rate-mbit R [--origin-rate-mbit R_o] [--systems dfly,http]`
builds a fresh `tests/netns` testbed per system (root), puts one file on the nginx origin (the dfly
devtools origin when nginx is missing), starts every client at once and prints, per system:
`system, hosts, file_bytes, rate_mbit, origin_rate_mbit, p50_s, p95_s, max_s, t_min_s, t_min_wire_s,
p95_over_tmin, max_over_tmin, origin_copies, cpu_s, sha_ok, client`.

Rules: T_min = max(F/R_o, F/R, N·F/(R_o + N·R)) at TCP payload rate (wire × 1448/1514; `t_min_wire_s`
at wire rate); a host's time is its client's exit minus t0, taken just before the first client is
launched; percentiles by linear interpolation; `origin_copies` = the origin's body bytes ÷ F;
`cpu_s` = CPU seconds of the system's own processes during the run (dfly: scheduler, seed, daemons and
dfget clients; http: the curl clients; the origin is common to both and not counted). Exits non-zero
with the reason when it cannot run; never prints a partial or made-up result. Not built yet (refused
with exit 2): the BitTorrent baseline, `--delay-ms` (no netem on these machines), `--stagger-s`,
`--files`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns.netns import TestbedError
from netns.testbed import Testbed, percentile, t_min_s

SYSTEMS = ("dfly", "http")


def process_cpu_s(pids: list[int]) -> float:
    """utime + stime of live processes, from /proc/PID/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    file_bytes = args.file_mib * 1024 * 1024
    origin_rate = args.origin_rate_mbit or args.rate_mbit
    with Testbed(hosts=args.hosts, rate_mbit=args.rate_mbit, origin_rate_mbit=origin_rate) as bed:
        url, _ = bed.add_file(f"blob-{args.file_mib}m", file_bytes)
        dfly_pids = bed.dfly_pids() if system == "dfly" else []
        cpu_before = process_cpu_s(dfly_pids) + children_cpu_s()
        origin_before = bed.origin_bytes()
        if system == "dfly":
            times, client = bed.run_dfget(None, url), "dfget --no-progress URL -O OUT"
        else:
            times, client = bed.run_curl(None, url), "curl -sf -o OUT URL"
        cpu_s = process_cpu_s(dfly_pids) + children_cpu_s() - cpu_before
        copies = (bed.origin_bytes() - origin_before) / file_bytes
    t_min = t_min_s(file_bytes, args.hosts, args.rate_mbit, origin_rate)
    return {
        "system": system,
        "hosts": args.hosts,
        "file_bytes": file_bytes,
        "rate_mbit": args.rate_mbit,
        "origin_rate_mbit": origin_rate,
        "p50_s": round(percentile(times, 50), 3),
        "p95_s": round(percentile(times, 95), 3),
        "max_s": round(max(times), 3),
        "t_min_s": round(t_min, 3),
        "t_min_wire_s": round(t_min_s(file_bytes, args.hosts, args.rate_mbit, origin_rate, payload=False), 3),
        "p95_over_tmin": round(percentile(times, 95) / t_min, 3),
        "max_over_tmin": round(max(times) / t_min, 3),
        "origin_copies": round(copies, 4),
        "cpu_s": round(cpu_s, 2),
        "sha_ok": True,  # run_dfget / run_curl raise on any mismatch
        "client": client,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dfly swarm benchmark in network namespaces (root)")
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--file-mib", type=int, default=64)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--origin-rate-mbit", type=float, default=None)
    parser.add_argument("--systems", default="dfly,http")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--stagger-s", type=float, default=0.0)
    parser.add_argument("--files", type=int, default=1)
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"systems {unknown} are not built yet (available: {', '.join(SYSTEMS)})")
    if args.delay_ms:
        parser.error("--delay-ms needs netem, which this machine's kernel does not have")
    if args.stagger_s or args.files != 1:
        parser.error("--stagger-s and --files are not built yet")
    if os.geteuid() != 0:
        print("swarm: needs root for network namespaces", file=sys.stderr)
        return 1
    results = []
    try:
        for system in systems:
            results.append(run_system(system, args))
    except (TestbedError, OSError) as exc:
        print(f"swarm: could not run: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
