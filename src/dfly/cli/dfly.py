"""The `dfly` command: `dfly scheduler ...` (the scheduler server), `dfly up` (an all-in-one cluster) and
`dfly sim ...` (the swarm simulator).

Rules: parse, call, print. `dfly scheduler` and `dfly sim` hand their arguments unchanged to
`dfly.scheduler.app.main` and `dfly.sim.cli.main`, each imported only in its branch. `dfly up` runs a
`dfly.cluster.LocalCluster` in the foreground until Ctrl-C, SIGTERM or SIGHUP (exit 0) or until a member dies
(exit 1); exit codes follow the error tree.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from dfly.cli.quiet_start import quiet_until_loaded
from dfly.common.cli_args import OneLineParser
from dfly.common.errors import DflyError
from dfly.common.stop_signals import STOP_SIGNALS

if TYPE_CHECKING:
    from dfly.cluster import LocalCluster


def _say(text: str, *, error: bool = False) -> None:
    """Print one line of `dfly up`'s own output. Once the terminal is gone (EIO after a hang-up, EPIPE)
    the process's stdout and stderr become /dev/null: the stop that follows must still run, and the
    exit must not fail on the text left in the buffer."""
    try:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)
    except OSError:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
        os.close(null)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dfly", description="dfly: peer-to-peer file distribution")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("scheduler", help="run the scheduler (see `dfly scheduler --help`)", add_help=False)
    sub.add_parser(
        "sim", help="simulate a swarm with the real scheduler core (see `dfly sim --help`)", add_help=False
    )
    up = sub.add_parser("up", help="run a scheduler, a seed peer and N peers on 127.0.0.1")
    up.add_argument("--peers", type=int, default=3, help="number of (non-seed) peers (default 3)")
    up.add_argument("--dir", default=None, help="directory for configs, logs, data (default: a new temp dir)")
    up.add_argument(
        "--seed-upload-limit",
        type=int,
        default=0,
        metavar="BYTES_PER_S",
        help="upload rate limit of the seed peer in bytes/s (default 0 = unlimited)",
    )
    up.add_argument(
        "--registry-mirror",
        default="",
        metavar="URL",
        help="upstream registry of every daemon's mirror (proxy.registry_mirror), e.g. http://127.0.0.1:5000",
    )
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    up.add_argument("--ready-timeout", type=_seconds, default=60.0, help="seconds to wait for each stage")
    return parser


def format_table(cluster: LocalCluster) -> str:
    """A short table of the members and an example dfget command line."""
    rows = [("NAME", "ROLE", "PID", "PORTS", "SOCKET")]
    for m in cluster.members:
        ports = " ".join(f"{k}={v}" for k, v in sorted(m.ports.items()))
        rows.append((m.name, m.role, str(m.pid), ports, str(m.socket or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"cluster dir:  {cluster.base_dir}   (description: {cluster.cluster_json})")
    example = cluster.peers[0] if cluster.peers else cluster.seed
    lines.append(f"try:          dfget -e {example.socket} http://HOST/PATH -O /tmp/out")
    lines.append("stop:         Ctrl-C (or SIGTERM, or closing the terminal)")
    return "\n".join(lines)


class _Stop(Exception):
    pass


def _run_up(args: argparse.Namespace) -> int:
    from dfly.cluster import LocalCluster
    from dfly.daemon.proxy.registry import BadRequest, normalize_upstream

    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            raise _Stop()

    if args.registry_mirror:
        try:
            normalize_upstream(args.registry_mirror)
        except BadRequest as exc:
            print(f"dfly up: --registry-mirror: {exc}", file=sys.stderr)
            return 2
    if args.dir == "":
        print("dfly up: --dir is empty (leave it out for a new temp dir)", file=sys.stderr)
        return 2
    try:  # a bad --dir is the caller's to fix: exit 2 before anything starts (none: a new temp dir)
        if args.dir is not None:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=args.dir).close()  # writable (os.access says yes to root always)
    except (FileExistsError, NotADirectoryError):
        print(f"dfly up: --dir {args.dir} is not a directory", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dfly up: --dir {args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    mirror = {"proxy": {"registry_mirror": args.registry_mirror}} if args.registry_mirror else {}
    cluster = LocalCluster(
        args.dir,
        peers=args.peers,
        seed_upload_limit_bytes_per_s=args.seed_upload_limit,
        log_level=args.log_level,
        ready_timeout_s=args.ready_timeout,
        daemon_overrides={"*": mirror} if mirror else None,
    )
    _say(f"dfly up: starting in {cluster.base_dir}")
    code = 0
    try:
        cluster.start()
        _say(format_table(cluster))
        while not stop_requested.wait(0.5):
            dead = cluster.failed_members()
            if dead:
                for m in dead:
                    code_m = m.process.returncode if m.process is not None else None
                    _say(f"dfly up: {m.name} exited with code {code_m}; see {m.log_path}", error=True)
                code = 1
                break
    except _Stop:
        pass
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        _say("dfly up: stopping")
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    with quiet_until_loaded() as loaded:  # the subcommands' imports take a few hundred ms
        return _main(list(sys.argv[1:] if argv is None else argv), loaded)


def _main(args_list: list[str], loaded: Callable[[], None]) -> int:
    if args_list and args_list[0] == "scheduler":
        from dfly.scheduler.app import main as scheduler_main

        loaded()  # it stops on KeyboardInterrupt, then on its event loop's signal handlers
        return int(scheduler_main(args_list[1:]) or 0)
    if args_list and args_list[0] == "sim":
        from dfly.sim.cli import main as sim_main

        loaded()
        return sim_main(args_list[1:])
    from dfly.cluster import ClusterError
    from dfly.daemon.config import MAX_RATE_LIMIT_BYTES_PER_S as MAX_UPLOAD_LIMIT

    args = _parser().parse_args(args_list)
    try:
        if args.command == "up":
            if args.peers < 0:
                print("dfly up: --peers must be >= 0", file=sys.stderr)
                return 2
            if not 0 <= args.seed_upload_limit <= MAX_UPLOAD_LIMIT:
                limits = f"between 0 and {MAX_UPLOAD_LIMIT}"
                print(f"dfly up: --seed-upload-limit must be {limits}", file=sys.stderr)
                return 2
            return _run_up(args)  # its own signal handlers from the cluster's start on
    except ClusterError as exc:
        print(f"dfly: {exc}", file=sys.stderr)
        return exc.exit_code
    except DflyError as exc:
        print(f"dfly: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"dfly: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
