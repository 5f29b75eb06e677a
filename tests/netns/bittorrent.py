"""BitTorrent baseline on the testbed: Debian's aria2c, a whitelist-only opentracker and mktorrent.

Job: `run_bittorrent(bed, names)` swarms files already on the origin (`Testbed.add_file`, run with
start_dfly=False) to every host and returns per-host times, the seeder's upload and the CPU used.
Rules (testbed-notes.md): one torrent per file (`mktorrent -l 18`: 256 KiB pieces); opentracker in the
scheduler's (uncapped) namespace with `-f CONF`, CONF = `access.whitelist ABSOLUTE_PATH` listing the
info-hashes printed by `aria2c -S` (it drops to nobody, so the work dir is made traversable); the seeder
is one aria2c in the seed namespace (capped at R_o both ways) serving the origin's files with
`--bt-seed-unverified=true`; one leecher aria2c per host with every torrent at once (`-j K`); all use
exactly ARIA2_FLAGS (DHT, LPD and PEX off, keep seeding, no peer limit, 2 s re-announce). The clock
starts only once the tracker lists the seeder as complete for every torrent (tracker scrape). A file is
done when aria2c runs `--on-bt-download-complete`: the hook writes the file's path to a FIFO the caller
polls, stamped with time.monotonic() on arrival; a host is done with its last file. The seeder's upload
is aria2c's own count (`uploadLength` summed over its torrents by JSON-RPC on its loopback), i.e. piece
payload without protocol overhead. `cpu_s` = utime + stime of tracker, seeder and leechers from t0 to
the last completion (/proc); mktorrent and `aria2c -S` are set-up and not counted. Every leecher's file
must have the origin's sha256. Every process is SIGKILLed and reaped on return or failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .clients import Events, run_staggered
from .netns import Node, TestbedError, process_cpu_split_s, signal_group
from .testbed import Testbed

ARIA2_FLAGS = (
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--seed-ratio=0.0",
    "--bt-max-peers=0",
    "--file-allocation=none",
    "--bt-tracker-interval=2",
)
QUIET = ("--summary-interval=0", "--console-log-level=warn", "--enable-color=false")  # log noise only
TOOLS = ("aria2c", "mktorrent", "opentracker", "curl")
TRACKER_PORT = 6969
RPC_PORT = 6800
POLL_S = 0.05  # between two tracker/RPC queries while waiting for the seeder to be listed


@dataclass
class SwarmResult:
    """Per-host seconds (from each host's start), bytes the seeder uploaded, CPU seconds, command lines."""

    times: list[float]
    seeder_upload_bytes: int
    cpu_s: float
    client: str
    cpu_user_s: float = 0.0  # the user-mode part of cpu_s


def missing_tools() -> list[str]:
    """The programs of this baseline that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def client_flags(files: int) -> str:
    """The exact command lines (paths and the RPC secret as placeholders), for the figures' `client`."""
    flags, k = " ".join((*ARIA2_FLAGS, *QUIET)), f"-j {files}"
    return (
        f"leecher: aria2c {flags} {k} -d OUT --on-bt-download-complete=HOOK {files} TORRENT_FILES; "
        f"seeder: aria2c {flags} {k} --bt-seed-unverified=true -d ORIGIN_DIR --enable-rpc "
        f"--rpc-listen-port={RPC_PORT} --rpc-secret=SECRET {files} TORRENT_FILES; "
        f"tracker: opentracker -f CONF -i IP -p {TRACKER_PORT} -P {TRACKER_PORT} "
        f"(CONF: access.whitelist PATH); torrents: mktorrent -l 18 -a http://IP:{TRACKER_PORT}/announce "
        "-o TORRENT FILE"
    )


def _run(node: Node, *argv: str, timeout_s: float = 10.0) -> subprocess.CompletedProcess[bytes]:
    """A short command inside `node`'s namespace, bytes out (scrapes are bencoded binary)."""
    cmd = ["ip", "netns", "exec", node.ns, *argv]
    return subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)


def make_torrent(path: Path, torrent: Path, announce: str) -> str:
    """mktorrent `path` into `torrent` (256 KiB pieces); returns its info-hash (hex) from `aria2c -S`."""
    mk = subprocess.run(["mktorrent", "-l", "18", "-a", announce, "-o", str(torrent), str(path)],
                        capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    if mk.returncode != 0:
        raise TestbedError(f"mktorrent failed ({mk.returncode}): {mk.stderr.strip()}")
    show = subprocess.run(
        ["aria2c", "-S", str(torrent)], capture_output=True, text=True, timeout=30, check=False
    )
    if not (found := re.search(r"^Info Hash: ([0-9a-f]{40})$", show.stdout, re.M)):
        raise TestbedError(f"no info-hash in `aria2c -S {torrent}`: {show.stdout[-300:]} {show.stderr}")
    return found.group(1)


def _seeders(bed: Testbed, info_hash: str) -> int | None:
    """Complete peers the tracker lists for `info_hash` (scrape), None while it does not answer."""
    query = urllib.parse.quote(bytes.fromhex(info_hash), safe="")
    url = f"http://{bed.scheduler.ip}:{TRACKER_PORT}/scrape?info_hash={query}"
    scrape = _run(bed.scheduler, "curl", "-sf", "--max-time", "2", url)
    if scrape.returncode != 0 or not scrape.stdout.startswith(b"d5:files"):
        return None
    found = re.search(rb"8:completei(\d+)e", scrape.stdout)
    return int(found.group(1)) if found else 0


def _wait(
    bed: Testbed, ready: Callable[[], bool], procs: Sequence[subprocess.Popen[bytes]], what: str
) -> None:
    """Poll `ready` until true (bounded by bed.ready_timeout_s); raise if a process in `procs` exits."""
    deadline = time.monotonic() + bed.ready_timeout_s
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                raise TestbedError(f"{proc.args!r} exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TestbedError(f"{what}: not within {bed.ready_timeout_s:g} s (see {bed.dir})")
        time.sleep(POLL_S)


def seeder_upload(bed: Testbed, secret: str, torrents: int) -> int:
    """Bytes the seeder uploaded: `uploadLength` of its torrents, by aria2 JSON-RPC on its loopback."""
    body = json.dumps({"jsonrpc": "2.0", "id": "swarm", "method": "aria2.tellActive",
                       "params": [f"token:{secret}", ["gid", "uploadLength"]]})  # fmt: skip
    url = f"http://127.0.0.1:{RPC_PORT}/jsonrpc"
    reply = _run(bed.seed, "curl", "-sf", "--max-time", "5", "-d", body, url)
    if reply.returncode != 0:
        raise TestbedError(f"seeder RPC failed ({reply.returncode}): {reply.stderr.decode(errors='replace')}")
    active = json.loads(reply.stdout)["result"]
    if len(active) != torrents:
        raise TestbedError(f"seeder has {len(active)} active torrents, not {torrents}")
    return sum(int(item["uploadLength"]) for item in active)


def run_bittorrent(
    bed: Testbed, names: Sequence[str], *, stagger_s: float = 0.0, timeout_s: float = 120.0
) -> SwarmResult:
    """Swarm the origin files `names` to every host (host i starts at t0 + i·stagger_s)."""
    work = bed.dir / "bt"
    work.mkdir()
    os.chmod(bed.dir, 0o711)  # opentracker runs as nobody: it must reach its config and whitelist
    os.chmod(work, 0o755)
    announce = f"http://{bed.scheduler.ip}:{TRACKER_PORT}/announce"
    torrents = [work / f"{name}.torrent" for name in names]
    hashes = [make_torrent(bed.origin_root / n, t, announce) for n, t in zip(names, torrents, strict=True)]
    (work / "whitelist").write_text("".join(f"{h}\n" for h in hashes))
    (work / "tracker.conf").write_text(f"access.whitelist {work / 'whitelist'}\n")
    for path in (work / "whitelist", work / "tracker.conf", *torrents):
        os.chmod(path, 0o644)
    k, port, files = str(len(names)), str(TRACKER_PORT), [str(t) for t in torrents]
    procs: list[subprocess.Popen[bytes]] = []
    fifo_fd = -1
    try:
        conf, ip = str(work / "tracker.conf"), bed.scheduler.ip
        tracker_argv = ["opentracker", "-f", conf, "-i", ip, "-p", port, "-P", port]
        procs.append(bed.spawn(bed.scheduler, tracker_argv, "tracker"))
        _wait(bed, lambda: _seeders(bed, hashes[0]) is not None, procs, "opentracker to answer")
        secret = secrets.token_hex(16)
        seeder_argv = ["aria2c", *ARIA2_FLAGS, *QUIET, "-j", k, "--bt-seed-unverified=true",
                       "-d", str(bed.origin_root), "--enable-rpc", f"--rpc-listen-port={RPC_PORT}",
                       f"--rpc-secret={secret}", *files]  # fmt: skip
        procs.append(bed.spawn(bed.seed, seeder_argv, "seeder"))
        _wait(bed, lambda: all((_seeders(bed, h) or 0) >= 1 for h in hashes), procs, "the seeder's announce")

        fifo = work / "done.fifo"
        os.mkfifo(fifo, 0o600)
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # O_RDWR: no EOF/POLLHUP between writers
        hook = work / "done-hook"
        hook.write_text(f'#!/bin/sh\nprintf "%s\\n" "$3" > {shlex.quote(str(fifo))}\n')
        os.chmod(hook, 0o755)
        outs = {bed.dir / host.name / "bt": i for i, host in enumerate(bed.hosts)}

        def launch(i: int) -> list[subprocess.Popen[bytes]]:
            out = bed.dir / bed.hosts[i].name / "bt"
            out.mkdir(parents=True)
            argv = ["aria2c", *ARIA2_FLAGS, *QUIET, "-j", k, "-d", str(out),
                    f"--on-bt-download-complete={hook}", *files]  # fmt: skip
            procs.append(bed.spawn(bed.hosts[i], argv, f"aria2c-h{i}"))
            return [procs[-1]]

        def describe(i: int) -> str:
            return f"aria2c on h{i}:\n{bed.tail(f'aria2c-h{i}')}"

        events = Events(fifo_fd, lambda line: outs.get(Path(line).parent), len(names))
        user_before, sys_before = process_cpu_split_s([p.pid for p in procs])
        times = run_staggered(len(bed.hosts), stagger_s, launch, timeout_s, events=events, describe=describe)
        user_after, sys_after = process_cpu_split_s([p.pid for p in procs])
        cpu_user_s = user_after - user_before
        cpu_s = cpu_user_s + sys_after - sys_before
        uploaded = seeder_upload(bed, secret, len(names))
    finally:
        if fifo_fd >= 0:
            os.close(fifo_fd)
        for proc in procs:
            signal_group(proc, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    bed.verify([(out / name, name) for out in outs for name in names])
    return SwarmResult(times, uploaded, cpu_s, client_flags(len(names)), cpu_user_s)
