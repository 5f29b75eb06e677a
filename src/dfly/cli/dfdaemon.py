"""`dfdaemon --config FILE [--seed] [--ready-file PATH]`: runs a peer or seed-peer daemon.

Invalid config stops the process at start with one line naming the key (exit 2). SIGINT/SIGTERM stop it
cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dfly.cli.quiet_start import quiet_until_loaded
from dfly.common.cli_args import OneLineParser
from dfly.common.errors import DflyError
from dfly.common.ready_file import check_ready_file
from dfly.common.stop_signals import STOP_SIGNALS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="dfdaemon", description="dfly peer daemon")
    parser.add_argument("--config", type=Path, help="YAML config file (see docs/configuration.md)")
    parser.add_argument("--seed", action="store_true", help="run as a seed peer (reads the origin)")
    parser.add_argument("--ready-file", type=Path, help="write ports here as JSON once ready")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    # First: a SIGINT from here on asks for a clean stop (asyncio.run's own handler would cancel this
    # task in the middle of the start-up's imports or storage recovery instead).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)

    from dfly.common.config import load_config
    from dfly.common.limits import check_open_files_limit
    from dfly.common.logging import setup_logging
    from dfly.daemon.app import run
    from dfly.daemon.config import DaemonConfig
    from dfly.daemon.lifecycle import descriptors_needed

    check_ready_file(args.ready_file)

    flags = {"seed_peer.enable": True} if args.seed else {}
    config = load_config(DaemonConfig, args.config, "DFLY_DFDAEMON", flags=flags)
    setup_logging("dfdaemon", config.log_level)
    check_open_files_limit(*descriptors_needed(config))
    await run(config, ready_file=args.ready_file, stop=stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    with quiet_until_loaded() as loaded:
        args = parse_args(argv)
        loaded()  # from here a stop is asyncio's, then _main's (the heavy imports are in there)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except DflyError as exc:
        print(f"dfdaemon: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:  # a DflyError raised inside a TaskGroup arrives wrapped
        errors, rest = group.split(DflyError)
        if errors is None or rest is not None:
            raise
        first = _leaves(errors)[0]
        print(f"dfdaemon: {first}", file=sys.stderr)
        return first.exit_code
    except KeyboardInterrupt:
        return 0


def _leaves(group: BaseExceptionGroup[DflyError]) -> list[DflyError]:
    out: list[DflyError] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


if __name__ == "__main__":
    sys.exit(main())
