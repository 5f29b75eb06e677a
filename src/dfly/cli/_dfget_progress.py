"""dfget's progress display: a rich bar on a terminal, nothing otherwise.

Rule: `rich` is imported only inside `make_progress` when stderr is a TTY and progress is wanted, so a
dfget started by a script or a container runtime never pays for it.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Progress(Protocol):
    def start(self, total_bytes: int, label: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    def start(self, total_bytes: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def stop(self) -> None:
        pass


class RichProgress:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as _Bar

        self._bar = _Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: Any = None

    def start(self, total_bytes: int, label: str) -> None:
        self._bar.start()
        self._task = self._bar.add_task(label, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, nbytes)

    def stop(self) -> None:
        self._bar.stop()


def make_progress(enabled: bool) -> Progress:
    if enabled and sys.stderr.isatty():
        return RichProgress()
    return NoProgress()
