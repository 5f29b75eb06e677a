"""SIGTERM ends a benchmark the way Ctrl-C does: as an exception, so its `with` blocks stop what they
started.

Python's default SIGTERM ends the process at once, and the clusters, registries and containerd a bench
started outlived it (found after `pkill -f bench/image_pull.py`). Call `exit_on_sigterm()` first in a
bench's main, in the main thread. A second SIGTERM is ignored while the first one's clean-up runs (each
clean-up step bounds its own wait); SIGKILL still ends everything at once.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(128 + signum)
