"""A stop signal that arrives while a command is still loading ends it quietly with exit 0.

`dfdaemon` and `dfly` import their heavy modules (pydantic, gRPC, aiohttp, cryptography: a few hundred
ms) inside `main`, under `quiet_until_loaded()`: there Python's own SIGINT handler printed a
KeyboardInterrupt traceback from the middle of an import. The `loaded` it yields gives SIGINT back to
Python (asyncio.run installs its handler only over that one) and SIGTERM, SIGHUP their default, once
the command handles stops itself; leaving the block puts back what was there before (tests call `main`
in-process). dfget has its own entry module for this (dfget_main.py), since its Ctrl-C exit status is 130.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

from dfly.common.stop_signals import STOP_SIGNALS


def _stopped_while_loading(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _loaded() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@contextlib.contextmanager
def quiet_until_loaded() -> Iterator[Callable[[], None]]:
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stopped_while_loading)
    try:
        yield _loaded
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
