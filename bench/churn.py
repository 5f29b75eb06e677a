"""Soak benchmark: hosts keep downloading while peer daemons are SIGKILLed and restarted (issue 4).

A LocalCluster (scheduler, seed, `--hosts` peers) on 127.0.0.1 and a devtools origin. Rounds run until
`--duration-s` has passed (the last round is finished): in each round every host downloads the same
`--files` new files (fresh names, so new tasks) with dfget, one after another, all hosts at once. Every
`--kill-every-s` seconds a random running peer daemon (never the seed or the scheduler) is SIGKILLed,
and restarted `--down-s` later with its config and cache.

Counting, per download: `completed` (exit 0 and the right SHA-256), `corrupt` (exit 0, wrong bytes:
must be 0), `retried` (its own daemon was killed while it ran: run again once the daemon is back),
`failed` (it failed although its daemon stayed up: target 0). `origin_copies` = bytes the origin sent
÷ file size, over the run, and `origin_copies_per_round` next to the target of 2 × files per round;
`p2p_bytes_fraction` = 1 − origin bytes ÷ bytes delivered by completed downloads (target ≥ 0.6).

Prints ONE JSON line on stdout (progress on stderr). Exit 0 with figures (targets met or not, see
`targets_met`), 1 when the run could not be made (the reason on stderr, no figures).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfly.cluster import LocalCluster, Member, dfget_command
from dfly.common.digest import file_digest
from dfly.devtools.argtypes import non_negative_float, positive_float, positive_int
from dfly.devtools.origin import Origin, make_file
from dfly.devtools.stop_signals import exit_on_sigterm

MiB = 1024 * 1024
DFGET_TIMEOUT_S = 180.0


def log(msg: str) -> None:
    print(f"[churn] {msg}", file=sys.stderr, flush=True)


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    corrupt: int = 0
    delivered_bytes: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


class HostState:
    """Whether a peer daemon is up, and how often it was killed (read by workers, written by the killer)."""

    def __init__(self, names: list[str]) -> None:
        self.kills = dict.fromkeys(names, 0)
        self.up = {name: threading.Event() for name in names}
        for event in self.up.values():
            event.set()


def download(
    member: Member, url: str, digest: str, out: Path, hosts: HostState, tally: Tally, size: int
) -> None:
    """One download on one host, retried after its own daemon was killed."""
    assert member.socket is not None
    while True:
        if not hosts.up[member.name].wait(DFGET_TIMEOUT_S):
            raise RuntimeError(f"{member.name} did not come back")
        kills_before = hosts.kills[member.name]
        cmd = [*dfget_command(), "-e", str(member.socket), "--no-progress", url, "-O", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=DFGET_TIMEOUT_S, check=False)
        killed = hosts.kills[member.name] != kills_before or not hosts.up[member.name].is_set()
        if result.returncode == 0:
            if file_digest(out).value == digest:
                tally.add(completed=1, delivered_bytes=size)
            else:
                tally.add(corrupt=1)
            out.unlink(missing_ok=True)
            return
        if killed:
            tally.add(retried=1)
            continue
        tally.add(failed=1)
        with tally.lock:
            tally.failures.append(f"{member.name} {url}: {result.stderr.strip()[-300:]}")
        return


def host_round(
    member: Member, files: list[tuple[str, str]], work: Path, hosts: HostState, tally: Tally, size: int
) -> None:
    for url, digest in files:
        download(member, url, digest, work / f"out-{member.name}", hosts, tally, size)


def killer(cluster: LocalCluster, hosts: HostState, args: argparse.Namespace, stop: threading.Event) -> int:
    rng = random.Random(args.seed)
    kills = 0
    while not stop.wait(args.kill_every_s):
        name = rng.choice(sorted(hosts.kills))
        hosts.up[name].clear()
        hosts.kills[name] += 1
        cluster.kill_member(name)
        kills += 1
        log(f"killed {name}")
        if stop.wait(args.down_s):
            cluster.restart_member(name)
            hosts.up[name].set()
            break
        cluster.restart_member(name)
        hosts.up[name].set()
    return kills


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.file_mib * MiB
    tally = Tally()
    with Origin(work / "www") as origin, LocalCluster(work / "c", peers=args.hosts) as cluster:
        assert origin.root is not None
        peers = list(cluster.peers)
        hosts = HostState([p.name for p in peers])
        stop = threading.Event()
        kills: list[int] = []
        killing = threading.Thread(
            target=lambda: kills.append(killer(cluster, hosts, args, stop)), daemon=True
        )
        t0 = time.monotonic()
        killing.start()
        rounds = 0
        try:
            while rounds == 0 or time.monotonic() - t0 < args.duration_s:
                files = []
                for i in range(args.files):
                    name = f"r{rounds}-f{i}.bin"
                    files.append(
                        (origin.url(f"/{name}"), make_file(origin.root / name, size, seed=rounds * 100 + i))
                    )
                workers = [
                    threading.Thread(target=host_round, args=(peer, files, work, hosts, tally, size))
                    for peer in peers
                ]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                rounds += 1
                done = f"{tally.completed} completed, {tally.retried} retried, {tally.failed} failed"
                log(f"round {rounds}: {done}")
        finally:
            stop.set()
            killing.join(timeout=60)
        wall_s = time.monotonic() - t0
        origin_copies = origin.bytes_sent / size
    per_round = origin_copies / rounds
    p2p = 1 - origin_copies * size / tally.delivered_bytes if tally.delivered_bytes else 0.0
    targets = {
        "failed_zero": tally.failed == 0,
        "corrupt_zero": tally.corrupt == 0,
        "origin_copies_per_round_max_2x_files": per_round <= 2 * args.files,
        "p2p_bytes_fraction_min_0_6": p2p >= 0.6,
    }
    return {
        "bench": "churn",
        "hosts": args.hosts,
        "files_per_round": args.files,
        "file_bytes": size,
        "duration_s": args.duration_s,
        "wall_s": round(wall_s, 1),
        "rounds": rounds,
        "kills": kills[0] if kills else 0,
        "kill_every_s": args.kill_every_s,
        "down_s": args.down_s,
        "completed": tally.completed,
        "failed": tally.failed,
        "retried": tally.retried,
        "corrupt": tally.corrupt,
        "origin_copies": round(origin_copies, 3),
        "origin_copies_per_round": round(per_round, 3),
        "p2p_bytes_fraction": round(p2p, 4),
        "targets_met": targets,
        "failures": tally.failures[:5],
    }


def main() -> int:
    exit_on_sigterm()  # its clusters stop with it
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=positive_float, default=120.0)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--files", type=positive_int, default=4, help="distinct files per round")
    parser.add_argument("--file-mib", type=positive_int, default=16)
    parser.add_argument("--kill-every-s", type=positive_float, default=3.0)
    parser.add_argument(
        "--down-s", type=non_negative_float, default=0.5, help="how long a killed daemon stays down"
    )
    parser.add_argument("--seed", type=int, default=0, help="rng seed for the choice of victims")
    args = parser.parse_args()
    if args.hosts < 2:
        parser.error("--hosts must be >= 2 (daemons are killed in turn while the others serve)")
    try:
        with tempfile.TemporaryDirectory(prefix="dfly-churn-") as tmp:
            result = run(args, Path(tmp))
    except Exception as exc:  # a run that could not be made: say why, print no figures
        print(f"churn: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
