"""`make demo`: one file, one origin, a local cluster, dfget on every peer at once, and who sent what.

Steps: generate a file (256 MiB by default) in a temp dir, serve it with the dfly devtools origin,
start a `LocalCluster` (scheduler, seed, 3 peers), run `dfget --no-progress` against every peer's socket
at the same time, check each output's sha256, and print per daemon the time and the bytes it received
from the origin, the seed and other peers (the daemon's own counters, asked through its local API),
then the origin's total bytes sent and how many copies of the file that is.
Rules: everything (processes, temp dirs) is cleaned up on every exit path; exit 1 if any download fails
or any digest mismatches.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from dfly.cluster import ClusterError, LocalCluster, Member, dfget_command, query_stats
from dfly.common.cli_args import OneLineParser
from dfly.common.digest import file_digest

MiB = 1024 * 1024


@dataclass
class Row:
    name: str
    seconds: float | None = None
    ok: bool | None = None  # None: no download on this member
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def _download(peer: Member, url: str, out: Path, want_sha: str) -> Row:
    cmd = [*dfget_command(), "-e", str(peer.socket), url, "-O", str(out), "--no-progress"]
    started = time.monotonic()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    row = Row(peer.name, seconds=time.monotonic() - started)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        row.ok, row.note = False, f"dfget exit {proc.returncode}: {last}"
    elif not out.exists():
        row.ok, row.note = False, "dfget exited 0 but wrote no file"
    else:
        got = file_digest(out).value
        row.ok = got == want_sha
        row.note = "sha256 ok" if row.ok else f"sha256 MISMATCH {got[:16]}…"
    return row


def _mib(stats: dict[str, Any], key: str) -> str:
    value = stats.get("download_bytes", {}).get(key)
    return "?" if value is None else f"{value / MiB:.1f}"


def _print_report(rows: list[Row], origin_bytes: int, size: int) -> None:
    headers = ["daemon", "time (s)", "origin MiB", "seed MiB", "peers MiB", "result"]
    table_rows = [
        [
            r.name,
            "-" if r.seconds is None else f"{r.seconds:.2f}",
            _mib(r.stats, "back_to_source"),
            _mib(r.stats, "remote_seed"),
            _mib(r.stats, "remote_peer"),
            r.note,
        ]
        for r in rows
    ]
    summary = f"origin sent {origin_bytes / MiB:.1f} MiB = {origin_bytes / size:.2f} copies of the file"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("  ".join(headers))
        for tr in table_rows:
            print("  ".join(tr))
        print(summary)
        return
    table = Table(title=f"dfly demo: {size / MiB:.0f} MiB file, {sum(r.ok is not None for r in rows)} peers")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i in (0, 5) else "right")
    for tr in table_rows:
        table.add_row(*tr)
    console = Console()
    console.print(table)
    console.print(summary)


def run_demo(workdir: Path, size: int, peers: int, seed_upload_mib_s: int) -> int:
    from dfly.devtools.origin import Origin, make_file

    root = workdir / "origin"
    root.mkdir()
    print(f"generating a {size / MiB:.0f} MiB file …", flush=True)
    want_sha = make_file(root / "demo.bin", size, 7)
    origin = Origin(root, "127.0.0.1", 0)
    origin.start()
    try:
        url = origin.url("demo.bin")
        limit = (
            f"seed upload limited to {seed_upload_mib_s} MiB/s" if seed_upload_mib_s else "no upload limit"
        )
        print(f"origin: {url}\nstarting scheduler, seed ({limit}) and {peers} peers …", flush=True)
        cluster_dir = workdir / "cluster"
        with LocalCluster(
            cluster_dir, peers=peers, seed_upload_limit_bytes_per_s=seed_upload_mib_s * MiB
        ) as cluster:
            out_dir = workdir / "out"
            out_dir.mkdir()
            print(f"running dfget on {peers} peers at once …", flush=True)
            with ThreadPoolExecutor(max_workers=max(1, peers)) as pool:
                futures = [
                    pool.submit(_download, p, url, out_dir / f"{p.name}.bin", want_sha) for p in cluster.peers
                ]
                rows = [f.result() for f in futures]
            rows.insert(0, Row(cluster.seed.name, note="seed peer"))
            for row, member in zip(rows, cluster.daemons, strict=True):
                try:
                    row.stats = query_stats(str(member.socket))
                except (OSError, ValueError, ClusterError) as exc:
                    row.note += f" (no stats: {exc})"
        origin_bytes = int(origin.bytes_sent)
    finally:
        origin.stop()
    _print_report(rows, origin_bytes, size)
    failed = [r for r in rows if r.ok is False]
    for r in failed:
        print(f"demo: {r.name} failed: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m dfly.cli.demo", description="dfly demo: dfget on every peer at once"
    )
    parser.add_argument("--size-mib", type=int, default=256, help="size of the demo file (default 256)")
    parser.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    parser.add_argument(
        "--seed-upload-mib-s",
        type=int,
        default=100,
        help="the seed's upload limit, as a real seed's uplink would be (default 100; 0 = none)",
    )
    args = parser.parse_args(argv)
    if args.size_mib <= 0 or args.peers <= 0 or args.seed_upload_mib_s < 0:
        parser.error("--size-mib and --peers must be positive, --seed-upload-mib-s not negative")
    signal.signal(signal.SIGTERM, _on_term)
    try:
        with tempfile.TemporaryDirectory(prefix="dfly-demo-") as tmp:
            return run_demo(Path(tmp), args.size_mib * MiB, args.peers, args.seed_upload_mib_s)
    except KeyboardInterrupt as exc:
        print(f"demo: interrupted {exc}".rstrip(), file=sys.stderr)
        return 130
    except ClusterError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
