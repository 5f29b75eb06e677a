"""Benchmark: one file through dfly vs plain curl, and a peer-to-peer copy with the origin gone.

Prints ONE JSON line on stdout (progress goes to stderr):
- `dfget_over_curl`: median over interleaved pairs of (dfget wall time / curl wall time), each dfget a
  cold download through the seed (a fresh `?v=i` query = a new task), plus `_min` / `_max`;
- `p2p_over_curl_throughput`: peer 2 fetches a file peer 1 holds, with the origin and the seed stopped,
  its throughput divided by curl's (median) throughput;
- `daemon_peak_rss_mib`: the largest VmHWM of any daemon process (/proc/PID/status);
- `targets`: dfget/curl <= 1.3, p2p >= 0.8 x curl, RSS < 150 MiB, and whether each was met;
- `page_cache_write_s_per_gib`: this machine's cost of writing new page-cache memory (fresh vs just
  freed), because a cold dfget on one host writes three copies (seed cache, peer cache, output) where
  curl writes one.
Origin: nginx on 127.0.0.1 when installed (the launcher binds the listening socket at port 0 and hands it
to nginx through the NGINX environment variable, so no port is guessed), else the dfly devtools origin
(`"origin": "dfly-devtools"`). Times are process start to exit; outputs are on the same filesystem.
Rules: every output's sha256 is checked; if anything fails the script exits 1 with the reason on stderr
and prints no figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfly.cluster import LocalCluster, Member, dfget_command
from dfly.common.digest import file_digest
from dfly.devtools.page_cache import PageCacheBallast, page_cache_write_s_per_gib
from dfly.devtools.stop_signals import exit_on_sigterm

MiB = 1024 * 1024
GiB = 1024 * MiB
TARGETS = {"dfget_over_curl_max": 1.3, "p2p_over_curl_throughput_min": 0.8, "daemon_peak_rss_mib_max": 150}


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[single_download] {msg}", file=sys.stderr, flush=True)


def vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class NginxOrigin:
    """nginx serving ROOT on a socket bound here at port 0 and inherited through NGINX=fd;."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root, self.workdir = root, workdir
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_log = workdir / "access.log"

    def start(self) -> None:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            f"""{user}
daemon off;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format bytes '$request $status $body_bytes_sent';
    access_log {self.access_log} bytes;
    sendfile on;
    client_body_temp_path {self.workdir}/tmp-body;
    proxy_temp_path {self.workdir}/tmp-proxy;
    fastcgi_temp_path {self.workdir}/tmp-fastcgi;
    uwsgi_temp_path {self.workdir}/tmp-uwsgi;
    scgi_temp_path {self.workdir}/tmp-scgi;
    types {{ application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
"""
        )
        fd = self.sock.fileno()
        env = {**os.environ, "NGINX": f"{fd};"}
        cmd = [
            shutil.which("nginx") or "nginx",
            "-p",
            str(self.workdir),
            "-c",
            str(conf),
            "-e",
            str(self.workdir / "error.log"),
        ]
        with open(self.workdir / "nginx.out", "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, pass_fds=(fd,), stdout=out, stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    @property
    def bytes_sent(self) -> int:
        total = 0
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                field = line.rsplit(" ", 1)[-1]
                total += int(field) if field.isdigit() else 0
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


def wait_http_ok(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status in (200, 206):
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"origin {url} not answering within {timeout_s:g} s: {last}")


def timed(cmd: list[str], what: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{what} exited {proc.returncode}: {last}")
    return elapsed


def fetch_checked(run: Callable[[], float], out: Path, want: str, what: str) -> float:
    out.unlink(missing_ok=True)
    elapsed = run()
    got = file_digest(out).value if out.exists() else "(no file)"
    out.unlink(missing_ok=True)
    if got != want:
        raise BenchError(f"{what}: sha256 {got} != {want}")
    return elapsed


def dfget(peer: Member, url: str, out: Path, piece_length: str | None = None) -> float:
    cmd = [*dfget_command(), "-e", str(peer.socket), url, "-O", str(out), "--no-progress"]
    if piece_length is not None:
        cmd += ["--piece-length", piece_length]
    return timed(cmd, f"dfget on {peer.name}")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def curl(url: str, out: Path) -> float:
    return timed(["curl", "-s", "-f", "-o", str(out), url], "curl")


def run(
    work: Path, size: int, pairs: int, fill_page_cache: bool, piece_length: str | None = None
) -> dict[str, Any]:
    from dfly.devtools.origin import Origin, make_file

    if shutil.which("curl") is None:
        raise BenchError("curl is not installed")
    root, out = work / "origin", work / "out"
    root.mkdir()
    out.mkdir()
    log(f"generating {size // MiB} MiB …")
    want = make_file(root / "blob.bin", size, 1)
    origin: NginxOrigin | Any
    if shutil.which("nginx"):
        origin, origin_name = NginxOrigin(root, work), "nginx"
    else:
        origin, origin_name = Origin(root, "127.0.0.1", 0), "dfly-devtools"
    origin.start()
    origin_running = True
    result: dict[str, Any] = {
        "bench": "single_download",
        "size_mib": size // MiB,
        "origin": origin_name,
        "page_cache": "kept full (steady-state host)" if fill_page_cache else "free memory (cold VM)",
    }
    try:
        wait_http_ok(origin.url("blob.bin"))
        ballast = PageCacheBallast(work / "ballast.bin") if fill_page_cache else None
        if ballast is not None:
            log("filling the page cache (steady-state host) …")

        def settle() -> None:
            if ballast is not None:
                ballast.top_up()

        with LocalCluster(work / "cluster", peers=2) as cluster:
            peer1, peer2 = cluster.peers
            curl_s: list[float] = []
            dfget_s: list[float] = []
            cpu_runs: list[dict[str, float]] = []  # CPU seconds per dfget: seed, peer, dfget itself
            seed = next(m for m in cluster.daemons if m.name == "seed")
            warm = out / "warmup.bin"  # one unmeasured curl so the origin file is in the page cache
            fetch_checked(lambda: curl(origin.url("blob.bin?warmup"), warm), warm, want, "warm-up curl")
            for i in range(pairs):
                url = origin.url(f"blob.bin?v={i}")

                def one_curl(url: str = url) -> float:
                    settle()
                    return fetch_checked(lambda: curl(url, out / "curl.bin"), out / "curl.bin", want, "curl")

                def one_dfget(url: str = url) -> float:
                    settle()
                    f = out / "dfget.bin"
                    before = (process_cpu_s(seed.pid), process_cpu_s(peer1.pid), children_cpu_s())
                    elapsed = fetch_checked(lambda: dfget(peer1, url, f, piece_length), f, want, "dfget")
                    after = (process_cpu_s(seed.pid), process_cpu_s(peer1.pid), children_cpu_s())
                    names = ("seed", "peer", "dfget")
                    cpu_runs.append({k: a - b for k, a, b in zip(names, after, before, strict=True)})
                    return elapsed

                if i % 2 == 0:
                    curl_s.append(one_curl())
                    dfget_s.append(one_dfget())
                else:
                    dfget_s.append(one_dfget())
                    curl_s.append(one_curl())
                log(f"pair {i}: curl {curl_s[-1]:.2f} s, dfget {dfget_s[-1]:.2f} s")
            rss = {m.name: vm_hwm_mib(m.pid) for m in cluster.daemons}
            origin_bytes = int(origin.bytes_sent)
            p2p_url = origin.url("blob.bin?v=0")
            origin.stop()
            origin_running = False
            cluster.stop_member("seed")
            settle()
            p2p_s = fetch_checked(
                lambda: dfget(peer2, p2p_url, out / "p2p.bin", piece_length), out / "p2p.bin", want, "p2p"
            )
            log(f"p2p (origin and seed stopped): {p2p_s:.2f} s")
            for m in (peer1, peer2):
                rss[m.name] = max(filter(None, (rss.get(m.name), vm_hwm_mib(m.pid))), default=None)
    finally:
        if origin_running:
            origin.stop()
    fresh_s, reused_s = page_cache_write_s_per_gib(work)
    ratios = [d / c for d, c in zip(dfget_s, curl_s, strict=True)]
    curl_median = statistics.median(curl_s)
    rss_values = [v for v in rss.values() if v is not None]
    if not rss_values:
        raise BenchError("could not read VmHWM of any daemon")
    result.update(
        pairs=pairs,
        warmup_curl=True,
        curl_s=[round(x, 3) for x in curl_s],
        dfget_s=[round(x, 3) for x in dfget_s],
        piece_length=piece_length or "default",
        dfget_over_curl=round(statistics.median(ratios), 3),
        dfget_over_curl_min=round(min(ratios), 3),
        dfget_over_curl_max=round(max(ratios), 3),
        curl_throughput_mib_s=round(size / MiB / curl_median, 1),
        p2p_s=round(p2p_s, 3),
        p2p_throughput_mib_s=round(size / MiB / p2p_s, 1),
        p2p_over_curl_throughput=round(curl_median / p2p_s, 3),
        origin_bytes_sent_during_pairs=origin_bytes,
        cpu_s_per_dfget={k: round(statistics.median(r[k] for r in cpu_runs), 3) for k in cpu_runs[0]},
        daemon_peak_rss_mib=round(max(rss_values), 1),
        daemon_rss_mib={k: (None if v is None else round(v, 1)) for k, v in rss.items()},
        page_cache_write_s_per_gib={"fresh_memory": round(fresh_s, 3), "just_freed": round(reused_s, 3)},
        targets=TARGETS,
    )
    result["targets_met"] = {
        "dfget_over_curl": result["dfget_over_curl"] <= TARGETS["dfget_over_curl_max"],
        "p2p_over_curl_throughput": result["p2p_over_curl_throughput"]
        >= TARGETS["p2p_over_curl_throughput_min"],
        "daemon_peak_rss_mib": result["daemon_peak_rss_mib"] < TARGETS["daemon_peak_rss_mib_max"],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # its clusters stop with it
    parser = argparse.ArgumentParser(description="dfly single-download benchmark (one JSON line)")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved dfget/curl pairs (>= 3)")
    parser.add_argument("--workdir", default=None, help="parent dir for the temp dir (same fs for all files)")
    parser.add_argument(
        "--no-fill-page-cache",
        action="store_true",
        help="measure with free memory (every new page a host fault on these VMs) instead of a full cache",
    )
    parser.add_argument("--piece-length", default=None, help="passed to dfget (default: the piece rule)")
    args = parser.parse_args(argv)
    if args.pairs < 3 or args.size_mib <= 0:
        parser.error("--pairs must be >= 3 and --size-mib positive")
    try:
        with tempfile.TemporaryDirectory(prefix="dfly-bench-", dir=args.workdir) as tmp:
            result = run(
                Path(tmp), args.size_mib * MiB, args.pairs, not args.no_fill_page_cache, args.piece_length
            )
    except Exception as exc:
        print(f"single_download: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
