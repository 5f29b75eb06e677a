"""Benchmark: `ctr images pull` of a ~100 MiB image, direct from the registry vs through the dfly mirror.

Real processes on 127.0.0.1: Debian's docker-registry, a dfly cluster (scheduler, seed, 2 peers with
`proxy.registry_mirror` = the registry) and a fresh containerd root for every pull (`ctr images pull
--hosts-dir`, native snapshotter: fetch, verify and unpack). Each round pushes a new image (three layers
of 32 MiB of random data each) and pulls it three ways, one after the other:
- `direct`: containerd → registry;
- `cold`: containerd → peer-1's mirror, no daemon has the blobs (the seed reads the registry);
- `warm`: containerd → peer-2's mirror, after the cold pull (peer-2 gets the blobs from the swarm).
Prints ONE JSON line: median seconds per mode, `cold_over_direct` (target ≤ 1.3) and `warm_over_direct`
(target < 1), the registry's full blob copies per round, and whether the targets were met. Exits 1 (no
figures) if a pull fails or the registry served a blob to containerd itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "conformance"))
from registry_kit import MISSING, Containerd, Registry, hosts_dir, push_image

from dfly.cluster import LocalCluster

MiB = 1 << 20
LAYER_MIB = 32


def timed_pull(work: Path, name: str, reference: str, hosts: Path) -> float:
    with Containerd(work / f"containerd-{name}") as containerd:
        started = time.monotonic()
        done = containerd.pull(reference, hosts)
        seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} pull failed: {done.stderr.strip() or done.stdout.strip()}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if MISSING:
        print(f"image_pull: not installed: {', '.join(MISSING)}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"direct": [], "cold": [], "warm": []}
    copies: list[int] = []
    with tempfile.TemporaryDirectory(prefix="dfly-image-pull-") as tmp:
        base = Path(tmp)
        with Registry(base / "registry") as registry:
            overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
            with LocalCluster(base / "cluster", peers=2, daemon_overrides=overrides) as cluster:
                direct_hosts = base / "hosts-direct"  # no hosts.toml: containerd asks the registry
                direct_hosts.mkdir()
                mirrors = {
                    peer.name: hosts_dir(base / f"hosts-{peer.name}", registry, peer.ports["proxy"])
                    for peer in cluster.peers
                }
                try:
                    for k in range(args.rounds):
                        work = base / f"round-{k}"
                        reference, digests = push_image(registry, work, layers=3, layer_bytes=LAYER_MIB * MiB)
                        before = len(registry.blob_gets())
                        times["direct"].append(timed_pull(work, "direct", reference, direct_hosts))
                        direct_gets = len(registry.blob_gets())
                        times["cold"].append(timed_pull(work, "cold", reference, mirrors["peer-1"]))
                        times["warm"].append(timed_pull(work, "warm", reference, mirrors["peer-2"]))
                        mirrored = registry.blob_gets()[direct_gets:]
                        if any("containerd" in ua for _, ua, _ in mirrored):
                            raise RuntimeError(
                                "containerd fetched a blob from the registry during a mirror pull"
                            )
                        full = Counter(d for d, _, size in mirrored if size > 1)
                        copies.append(sum(full.values()))
                        print(f"round {k}: " + json.dumps({m: round(t[-1], 3) for m, t in times.items()}
                              | {"direct_blob_gets": direct_gets - before, "mirror_blob_copies": copies[-1],
                                 "blobs": len(digests)}), file=sys.stderr)  # fmt: skip
                except RuntimeError as exc:
                    print(f"image_pull: {exc}", file=sys.stderr)
                    return 1
    median = {mode: statistics.median(values) for mode, values in times.items()}
    result: dict[str, Any] = {
        "bench": "image_pull",
        "image_mib": 3 * LAYER_MIB,
        "rounds": args.rounds,
        **{f"{mode}_s": round(value, 3) for mode, value in median.items()},
        "cold_over_direct": round(median["cold"] / median["direct"], 3),
        "warm_over_direct": round(median["warm"] / median["direct"], 3),
        "registry_blob_copies_per_round": copies,
    }
    result["targets_met"] = {
        "cold_le_1.3x_direct": result["cold_over_direct"] <= 1.3,
        "warm_faster_than_direct": result["warm_over_direct"] < 1.0,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
