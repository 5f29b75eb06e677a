"""Swarm benchmark on namespaced hosts with capped links (issue 3): one JSON line per system.

`bench/swarm.py --hosts N --file-mib F --rate-mbit R [--origin-rate-mbit R_o] [--delay-ms D]
[--systems dfly,http,bittorrent] [--stagger-s S] [--files K] [--piece-length L] [--force-hard-link]`
builds a fresh `tests/netns` testbed per system (root), puts K random files of F/K MiB on the nginx
origin (the dfly devtools origin when nginx is missing), starts every host's clients and prints, per
system: `system, hosts, file_bytes, files, stagger_s, rate_mbit, origin_rate_mbit, p50_s, p95_s, max_s,
t_min_s, t_min_wire_s, p95_over_tmin, max_over_tmin, origin_copies, cpu_s, sha_ok, client` (`client`:
the exact client command lines).

Systems: dfly (scheduler, seed peer at R_o, one dfdaemon per host; one `dfget` per file per host, all
at once), http (one `curl` per file per host from the origin) and bittorrent (tests/netns/bittorrent.py:
opentracker, an aria2c seeder in the seed namespace at R_o, one aria2c per host with one torrent per
file). The baselines' testbeds run no dfly processes. `--piece-length` and `--force-hard-link` go on
every dfget command line (with the latter the output is a hard link to the daemon's task file, one copy
of the bytes per host as aria2c writes, instead of dfget's default second copy).
Rules: host i starts its clients at t0 + i·S (t0 just before the first launch) and its time runs from
that start to its last file's completion (dfly/http: the client's exit; bittorrent: aria2c's
download-complete hook); p50/p95/max of these by linear interpolation. T_min = max(F/R_o, F/R,
N·F/(R_o + N·R)) for the F total at TCP payload rate (wire × 1448/1514; `t_min_wire_s` at wire rate);
the swarm term never exceeds F/R, so T_min is also the bound of one host alone, the right one for
staggered hosts. `origin_copies` = bytes the origin sent ÷ F: nginx's body bytes for dfly and http;
for bittorrent, whose origin is its seeder, the seeder's upload as counted by aria2c (piece payload;
within 1 % of the seed veth's HTB wire counter × 1448/1514 when checked). `cpu_s` = CPU seconds of the
system's own processes during the run (dfly: scheduler, seed, daemons and dfget clients; http: the curl
clients; bittorrent: tracker, seeder and leechers; the nginx origin is not counted); `cpu_user_s` is its
user-mode part (the rest is the kernel: copies, page-cache writes, the namespaced network stack);
`cpu_detail_s` splits it by role (scheduler, seed, daemons, clients; empty for bittorrent).
Validity (issue 3): at exactly 8 hosts × 64 MiB × 100 Mbit/s, R_o = R, one file, no stagger, a run with
bittorrent whose p95/T_min lies outside 1.5–2.6 or whose origin copies lie outside 1.2–1.7 is invalid:
exit 3 and no figures for any system. Other scenarios are not checked (16 × 64 MiB × 50 Mbit/s gave
copies up to 1.65 here, too near that band's edge to reuse it), nor is a run without bittorrent.
Exit codes: 0 figures printed; 1 could not run (reason on stderr; never a partial result); 2 bad
arguments; 3 invalid run; 4 skipped: --delay-ms needs sch_netem, probed first in a throwaway namespace
(these machines have none); with netem present, delay emulation is not built yet: exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns.bittorrent import missing_tools, run_bittorrent
from netns.netns import TestbedError, netem_missing, process_cpu_split_s
from netns.testbed import Testbed, percentile, t_min_s

from dfly.common.errors import UsageError
from dfly.common.pieces import parse_size, validate_user_piece_length
from dfly.devtools.argtypes import non_negative_float, positive_float, positive_int

SYSTEMS = ("dfly", "http", "bittorrent")
MIB = 1024 * 1024
# (hosts, file MiB, R, R_o) -> bittorrent's valid (p95/T_min, origin copies) ranges (issue 3, testbed-notes)
REFERENCE = {(8, 64, 100.0, 100.0): ((1.5, 2.6), (1.2, 1.7))}
EXIT_FAILED, EXIT_USAGE, EXIT_INVALID, EXIT_SKIPPED = 1, 2, 3, 4


def children_cpu_split_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


class Measured(NamedTuple):
    times: list[float]  # per host, seconds from its start
    copies: float  # origin bytes ÷ F
    cpu_s: float
    cpu_user_s: float  # the user-mode part of cpu_s (the kernel's copies and network stack are the rest)
    client: str
    detail: dict[str, float]  # cpu_s by role: scheduler, seed, daemons, clients; empty for bittorrent


def measure(system: str, args: argparse.Namespace) -> Measured:
    """Run one system in a fresh testbed."""
    file_bytes, origin_rate = args.file_mib * MIB, args.origin_rate_mbit or args.rate_mbit
    t_min = t_min_s(file_bytes, args.hosts, args.rate_mbit, origin_rate)
    timeout_s = 60 + 3 * args.hosts * t_min  # plain HTTP needs ~N·T_min
    with Testbed(args.hosts, args.rate_mbit, origin_rate, start_dfly=system == "dfly") as bed:
        suffix = [f"-{k}" for k in range(args.files)] if args.files > 1 else [""]
        urls = [bed.add_file(f"blob-{args.file_mib}m{s}", file_bytes // args.files)[0] for s in suffix]
        if system == "bittorrent":
            names = [url.rsplit("/", 1)[-1] for url in urls]
            swarm = run_bittorrent(bed, names, stagger_s=args.stagger_s, timeout_s=timeout_s)
            copies = swarm.seeder_upload_bytes / file_bytes
            return Measured(swarm.times, copies, swarm.cpu_s, swarm.cpu_user_s, swarm.client, {})
        groups = bed.dfly_pids()
        before = {role: process_cpu_split_s(pids) for role, pids in groups.items()}
        before["clients"] = children_cpu_split_s()
        origin_before = bed.origin_bytes()
        each = f" ({args.files} per host at once)" if args.files > 1 else ""
        if system == "dfly":
            extra = ["--piece-length", args.piece_length] if args.piece_length else []
            extra += ["--force-hard-link"] if args.force_hard_link else []
            times = bed.run_dfget(None, urls, timeout_s, stagger_s=args.stagger_s, extra_args=extra)
            client = (
                f"python -m dfly.cli.dfget -e SOCKET --no-progress {' '.join([*extra, ''])}URL -O OUT{each}"
            )
        else:
            times = bed.run_curl(None, urls, timeout_s, stagger_s=args.stagger_s)
            client = f"curl -sf -o OUT URL{each}"
        bed.check_alive()
        after = {role: process_cpu_split_s(pids) for role, pids in groups.items()}
        after["clients"] = children_cpu_split_s()
        detail = {role: sum(after[role]) - sum(before[role]) for role in after}
        user = sum(after[role][0] - before[role][0] for role in after)
        copies = (bed.origin_bytes() - origin_before) / file_bytes
        return Measured(times, copies, sum(detail.values()), user, client, detail)


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    times, copies, cpu_s, cpu_user_s, client, detail = measure(system, args)
    file_bytes, origin_rate = args.file_mib * MIB, args.origin_rate_mbit or args.rate_mbit
    t_min = t_min_s(file_bytes, args.hosts, args.rate_mbit, origin_rate)
    return {
        "system": system,
        "hosts": args.hosts,
        "file_bytes": file_bytes,
        "files": args.files,
        "stagger_s": args.stagger_s,
        "piece_length": args.piece_length if system == "dfly" and args.piece_length else None,
        "rate_mbit": args.rate_mbit,
        "origin_rate_mbit": origin_rate,
        "p50_s": round(percentile(times, 50), 3),
        "p95_s": round(percentile(times, 95), 3),
        "max_s": round(max(times), 3),
        "t_min_s": round(t_min, 3),
        "t_min_wire_s": round(t_min_s(file_bytes, args.hosts, args.rate_mbit, origin_rate, payload=False), 3),
        "p95_over_tmin": round(percentile(times, 95) / t_min, 3) if t_min > 0 else None,
        "max_over_tmin": round(max(times) / t_min, 3) if t_min > 0 else None,
        "origin_copies": round(copies, 4),
        "cpu_s": round(cpu_s, 2),
        "cpu_user_s": round(cpu_user_s, 2),
        "cpu_detail_s": {role: round(seconds, 2) for role, seconds in detail.items()},
        "sha_ok": True,  # every output was checked; a mismatch raises before any figure exists
        "client": client,
    }


def invalid_reason(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    """Why this run is invalid by the reference bands ("" if valid or not a reference scenario)."""
    origin_rate = args.origin_rate_mbit or args.rate_mbit
    bands = REFERENCE.get((args.hosts, args.file_mib, args.rate_mbit, origin_rate))
    if bands is None or args.files != 1 or args.stagger_s:
        return ""
    (p95_lo, p95_hi), (copies_lo, copies_hi) = bands
    for result in (r for r in results if r["system"] == "bittorrent"):
        p95, copies = result["p95_over_tmin"], result["origin_copies"]
        if not (p95_lo <= p95 <= p95_hi and copies_lo <= copies <= copies_hi):
            return (f"bittorrent p95/T_min {p95} (valid {p95_lo}–{p95_hi}) or origin copies {copies} "
                    f"(valid {copies_lo}–{copies_hi}) is outside the reference band")  # fmt: skip
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dfly swarm benchmark in network namespaces (root)")
    parser.add_argument("--hosts", type=positive_int, default=8)
    parser.add_argument(
        "--file-mib", type=positive_int, default=64, help="total MiB per host (split by --files)"
    )
    parser.add_argument(
        "--rate-mbit", type=non_negative_float, default=100.0, help="per-host cap; 0 = uncapped"
    )
    parser.add_argument("--origin-rate-mbit", type=positive_float, default=None)
    parser.add_argument("--systems", default="dfly,http")
    parser.add_argument(
        "--delay-ms", type=non_negative_float, default=0.0, help="needs sch_netem (exit 4 without)"
    )
    parser.add_argument("--stagger-s", type=non_negative_float, default=0.0, help="host i starts at t0 + i·S")
    parser.add_argument(
        "--files", type=positive_int, default=1, help="K files of F/K MiB, all fetched at once"
    )
    parser.add_argument(
        "--piece-length", default=None, help="dfly only: dfget --piece-length (default: the piece rule)"
    )
    parser.add_argument(
        "--force-hard-link",
        action="store_true",
        help="dfly only: dfget --force-hard-link (the output shares the cache's inode; no second copy)",
    )
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown systems {unknown} (available: {', '.join(SYSTEMS)})")
    if not systems:
        parser.error(f"--systems names none (available: {', '.join(SYSTEMS)})")
    if args.piece_length is not None:
        try:
            validate_user_piece_length(parse_size(args.piece_length))
        except UsageError as exc:
            parser.error(f"--piece-length: {exc}")
    if args.file_mib * MIB % args.files:
        parser.error(f"{args.file_mib} MiB do not split into {args.files} equal files")
    if os.geteuid() != 0:
        print("swarm: needs root for network namespaces", file=sys.stderr)
        return EXIT_FAILED
    if "bittorrent" in systems and (missing := missing_tools()):
        print(f"swarm: bittorrent needs {', '.join(missing)} (apt-get install aria2 mktorrent opentracker)",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    results = []
    try:
        if args.delay_ms:
            if reason := netem_missing(f"dfn{os.getpid():x}x0"):
                print(f"skipped: --delay-ms needs sch_netem, not in this kernel ({reason})", file=sys.stderr)
                return EXIT_SKIPPED
            print("swarm: netem is present but --delay-ms is not built yet", file=sys.stderr)
            return EXIT_USAGE
        for system in systems:
            results.append(run_system(system, args))
    except (TestbedError, OSError) as exc:
        print(f"swarm: could not run: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("swarm: interrupted; everything was removed", file=sys.stderr)
        return 130
    if reason := invalid_reason(args, results):
        print(f"swarm: invalid run, no figures: {reason}", file=sys.stderr)
        return EXIT_INVALID
    for result in results:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
