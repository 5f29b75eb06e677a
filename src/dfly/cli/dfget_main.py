"""Entry point of the `dfget` command: Ctrl-C is quiet from the first instant.

Importing dfget's modules takes ~20 ms, and a Ctrl-C in that window printed a traceback. Importing this
module (the console script does it before anything else of dfly's) installs a SIGINT handler that exits
with 130 and one line; `main` puts Python's own handler back once dfget is loaded, because dfget turns
KeyboardInterrupt into its clean-up (temporary output removed) and the same exit status.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _interrupted(signum: int, frame: FrameType | None) -> None:
    print("dfget: interrupted", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


signal.signal(signal.SIGINT, _interrupted)


def main() -> int:
    from dfly.cli.dfget import main as dfget_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return dfget_main()
