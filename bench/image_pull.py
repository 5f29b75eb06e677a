"""Benchmark: `ctr images pull` of a ~100 MiB image, direct from the registry vs through the dfly mirror.

Real processes on 127.0.0.1: Debian's docker-registry, a dfly cluster (scheduler, seed, 2 peers with
`proxy.registry_mirror` = the registry) and a fresh containerd root for every pull (`ctr images pull
--hosts-dir`, native snapshotter: fetch, verify and unpack). Each round pushes a new image (three layers
of 32 MiB of random data each) and pulls it four ways, one after the other:
- `direct`: containerd → registry;
- `cold`: containerd → peer-1's mirror, no daemon has the blobs (the seed reads the registry);
- `warm`: containerd → peer-2's mirror, after the cold pull (peer-2 gets the blobs from the swarm);
- `hit`: containerd → peer-2's mirror again: peer-2 holds every blob, so this is what serving through
  a mirror costs at the least here (no P2P, no store: read, verify, send), a floor for `warm`.
With `--registry-rate-mbit R` the registry runs in its own network namespace behind a veth pair shaped
to R Mbit/s both ways (HTB, as the swarm testbed), as a registry across a network link would be; the
daemons and containerd stay on this host's loopback, so only the registry is far.
Prints ONE JSON line: median seconds per mode, their ratios `cold_over_direct` and `warm_over_direct`,
and the medians of the per-round ratios `*_over_direct_paired`, which the targets are judged on (cold
≤ 1.3, warm < 1; the pulls of a round run back to back while rounds drift), the registry's full
blob copies per round, and whether the targets were met. Exits 1 (no figures) if a pull fails or the
registry served a blob to containerd itself. Each containerd root is deleted after its pull.
Page cache: kept full before every pull (a ballast file, dfly.devtools.page_cache), as on a long-running
host, unless `--no-fill-page-cache`: on these VMs a page of free memory costs a host fault, and a mirror
pull writes the blobs twice more than a direct one (the seed's and the peer's task files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "conformance"))
from registry_kit import MISSING, Containerd, Registry, hosts_dir, push_image
from registry_netns import registry_namespace

from dfly.cluster import LocalCluster
from dfly.devtools.argtypes import non_negative_float, positive_int
from dfly.devtools.page_cache import PageCacheBallast, page_cache_write_s_per_gib
from dfly.devtools.stop_signals import exit_on_sigterm

MiB = 1 << 20
LAYER_MIB = 32


def timed_pull(work: Path, name: str, reference: str, hosts: Path, ballast: PageCacheBallast | None) -> float:
    root = work / f"containerd-{name}"
    if ballast is not None:
        ballast.top_up()
    with Containerd(root) as containerd:
        started = time.monotonic()
        done = containerd.pull(reference, hosts)
        seconds = time.monotonic() - started
    shutil.rmtree(root, ignore_errors=True)  # later pulls do not pay for this one's page cache
    if done.returncode != 0:
        raise RuntimeError(f"{name} pull failed: {done.stderr.strip() or done.stdout.strip()}")
    return seconds


def paired(mode: list[float], direct: list[float]) -> float:
    """Median of the per-round ratios: a round's three pulls run back to back, so their ratio is not
    moved by the machine drifting between rounds (this VM slows as its memory fills)."""
    return round(statistics.median(m / d for m, d in zip(mode, direct, strict=True)), 3)


@contextlib.contextmanager
def registry_link(rate_mbit: float) -> Iterator[tuple[str, list[str]]]:
    """(registry address, command prefix): loopback, or a namespace behind a veth shaped to rate_mbit."""
    if not rate_mbit:
        yield "127.0.0.1", []
        return
    with registry_namespace(rate_mbit) as link:
        yield link


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # its clusters stop with it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument(
        "--registry-rate-mbit",
        type=non_negative_float,
        default=0.0,
        help="registry behind a link shaped to this (0: loopback)",
    )
    parser.add_argument(
        "--no-fill-page-cache",
        action="store_true",
        help="pull into free memory (every new page a host fault on these VMs) instead of a full cache",
    )
    args = parser.parse_args(argv)
    if MISSING:
        print(f"image_pull: not installed: {', '.join(MISSING)}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"direct": [], "cold": [], "warm": [], "hit": []}
    copies: list[int] = []
    with tempfile.TemporaryDirectory(prefix="dfly-image-pull-") as tmp:
        base = Path(tmp)
        fresh_s, reused_s = page_cache_write_s_per_gib(base)
        ballast = None if args.no_fill_page_cache else PageCacheBallast(base / "ballast.bin")
        with (
            registry_link(args.registry_rate_mbit) as (address, prefix),
            Registry(base / "registry", address=address, exec_prefix=prefix) as registry,
        ):
            overrides = {"*": {"proxy": {"registry_mirror": registry.url}}}
            with LocalCluster(base / "cluster", peers=2, daemon_overrides=overrides) as cluster:
                direct_hosts = base / "hosts-direct"  # the registry itself, over plain HTTP
                (direct_hosts / registry.host).mkdir(parents=True)
                (direct_hosts / registry.host / "hosts.toml").write_text(
                    f'server = "{registry.url}"\n[host."{registry.url}"]\n'
                    '  capabilities = ["pull", "resolve"]\n'
                )
                mirrors = {
                    peer.name: hosts_dir(base / f"hosts-{peer.name}", registry, peer.ports["proxy"])
                    for peer in cluster.peers
                }
                try:
                    for k in range(args.rounds):
                        work = base / f"round-{k}"
                        reference, digests = push_image(registry, work, layers=3, layer_bytes=LAYER_MIB * MiB)
                        before = len(registry.blob_gets())
                        times["direct"].append(timed_pull(work, "direct", reference, direct_hosts, ballast))
                        direct_gets = len(registry.blob_gets())
                        times["cold"].append(timed_pull(work, "cold", reference, mirrors["peer-1"], ballast))
                        times["warm"].append(timed_pull(work, "warm", reference, mirrors["peer-2"], ballast))
                        times["hit"].append(timed_pull(work, "hit", reference, mirrors["peer-2"], ballast))
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
        "registry_rate_mbit": args.registry_rate_mbit or None,
        "rounds": args.rounds,
        **{f"{mode}_s": round(value, 3) for mode, value in median.items()},
        "cold_over_direct": round(median["cold"] / median["direct"], 3),
        "warm_over_direct": round(median["warm"] / median["direct"], 3),
        **{
            f"{mode}_over_direct_paired": paired(times[mode], times["direct"])
            for mode in ("cold", "warm", "hit")
        },
        "registry_blob_copies_per_round": copies,
        "page_cache": "free memory (cold VM)" if ballast is None else "kept full (steady-state host)",
        "page_cache_write_s_per_gib": {"fresh_memory": round(fresh_s, 3), "just_freed": round(reused_s, 3)},
    }
    result["targets_met"] = {
        "cold_le_1.3x_direct": result["cold_over_direct_paired"] <= 1.3,
        "warm_faster_than_direct": result["warm_over_direct_paired"] < 1.0,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
