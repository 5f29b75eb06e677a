"""`dfdaemon --config FILE [--seed] [--ready-file PATH]`: runs a peer or seed-peer daemon.

Invalid config stops the process at start with one line naming the key (exit 2). SIGINT/SIGTERM stop it
cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from dfly.common.config import load_config
from dfly.common.errors import DflyError
from dfly.common.logging import setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dfdaemon", description="dfly peer daemon")
    parser.add_argument("--config", type=Path, help="YAML config file (see docs/configuration.md)")
    parser.add_argument("--seed", action="store_true", help="run as a seed peer (reads the origin)")
    parser.add_argument("--ready-file", type=Path, help="write ports here as JSON once ready")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    from dfly.daemon.app import run
    from dfly.daemon.config import DaemonConfig

    flags = {"seed_peer.enable": True} if args.seed else {}
    config = load_config(DaemonConfig, args.config, "DFLY_DFDAEMON", flags=flags)
    setup_logging("dfdaemon", config.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run(config, ready_file=args.ready_file, stop=stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except DflyError as exc:
        print(f"dfdaemon: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
