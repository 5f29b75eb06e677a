"""Benchmark: the cost of `security.tls.pieces` (mTLS on piece transfer, which rules out sendfile).

Two local clusters on 127.0.0.1 (scheduler, seed, 2 peers), one with plain piece transfer and one with
`security.tls.pieces`, both with mTLS on the control plane. In each, peer-1 downloads a file through the
seed (warm-up: the seed reads the origin), then peer-2 downloads it from the seed and peer-1 only; that
second download is measured (the origin must send it nothing): its dfget wall time, and the CPU
seconds of every daemon plus dfget.
Rounds alternate plain / TLS with a new file each round (a new task), so both see the same machine state.

Prints ONE JSON line: per mode the median `seconds`, `cpu_s` and `mib_per_s`, and the ratios
`tls_over_plain_seconds` and `tls_over_plain_cpu` (the cost). Every output's sha256 is checked; on any
failure it exits 1 with the reason on stderr and prints no figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dfly.cluster import LocalCluster, Member
from dfly.common.digest import file_digest
from dfly.devtools.argtypes import positive_int
from dfly.devtools.origin import Origin, make_file
from dfly.devtools.pki import make_pki
from dfly.devtools.stop_signals import exit_on_sigterm

MiB = 1024 * 1024
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from clusterkit import dfget_cmd  # noqa: E402


def cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dfget(member: Member, url: str, out: Path, timeout_s: float) -> None:
    done = subprocess.run(dfget_cmd(member, url, out), capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"dfget on {member.name} failed ({done.returncode}): {done.stderr.strip()}")


def measure_round(
    cluster: LocalCluster, origin: Origin, work: Path, name: str, size: int
) -> dict[str, float]:
    assert origin.root is not None
    digest = make_file(origin.root / name, size, seed=len(name))
    url = origin.url(f"/{name}")
    warm, out = work / f"{name}.warm", work / f"{name}.out"
    dfget(cluster.peers[0], url, warm, 300)
    pids = [m.pid for m in cluster.daemons]
    origin0 = origin.bytes_sent
    cpu0, child0, t0 = cpu_s(pids), children_cpu_s(), time.monotonic()
    dfget(cluster.peers[1], url, out, 300)
    seconds = time.monotonic() - t0
    used = cpu_s(pids) + children_cpu_s() - cpu0 - child0
    if origin.bytes_sent != origin0:  # the measured copy must be peer to peer, or it measures the origin
        raise RuntimeError(f"{name}: the origin sent {origin.bytes_sent - origin0} bytes to the second peer")
    for path in (warm, out):
        if file_digest(path).value != digest:
            raise RuntimeError(f"{path}: wrong sha256")
        path.unlink()
    (origin.root / name).unlink()
    return {"seconds": seconds, "cpu_s": used, "mib_per_s": size / MiB / seconds}


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # its clusters stop with it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-mib", type=positive_int, default=256)
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args(argv)
    size = args.file_mib * MiB
    with tempfile.TemporaryDirectory(prefix="dfly-piece-tls-") as tmp:
        base = Path(tmp)
        pki = make_pki(base / "pki", ["member"])
        files = {"ca_cert": str(pki["ca"]), "cert": str(pki["member"]), "key": str(pki["member.key"])}
        results: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
        with Origin(base / "www") as origin:
            assert origin.root is not None
            origin.root.mkdir(parents=True, exist_ok=True)
            clusters = {}
            try:
                for mode in results:
                    tls = {**files, "pieces": mode == "tls"}
                    overrides = {"*": {"security": {"tls": tls}}}
                    clusters[mode] = LocalCluster(
                        base / mode, peers=2, daemon_overrides=overrides,
                        scheduler_overrides={"security": {"tls": files}},
                    )  # fmt: skip
                    clusters[mode].start()
                for k in range(args.rounds):
                    for mode, cluster in clusters.items():
                        result = measure_round(cluster, origin, base, f"{mode}-{k}.bin", size)
                        results[mode].append(result)
                        print(f"round {k} {mode}: {json.dumps(result)}", file=sys.stderr)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                print(f"piece_tls: {exc}", file=sys.stderr)
                return 1
            finally:
                for cluster in clusters.values():
                    cluster.stop()
    summary: dict[str, Any] = {"bench": "piece_tls", "file_mib": args.file_mib, "rounds": args.rounds}
    for mode, rounds in results.items():
        summary[mode] = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    summary["tls_over_plain_seconds"] = round(summary["tls"]["seconds"] / summary["plain"]["seconds"], 3)
    summary["tls_over_plain_cpu"] = round(summary["tls"]["cpu_s"] / summary["plain"]["cpu_s"], 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
