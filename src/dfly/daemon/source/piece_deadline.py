"""A deadline on each piece read from an origin: `PieceDeadline`, one watchdog thread per origin read.

Job: an origin that keeps its connection alive but sends too slowly (a trickle, a stuck proxy) must not
hold an origin read, and every download waiting on it, for ever: the socket read timeout bounds only
each `recv`, and one `readinto` loops over many of them. As Dragonfly's `download.pieceTimeout`, a
piece read from the origin must arrive within `download.piece_timeout_s`.

Rules:
- `arm()` when a piece's read starts, `disarm()` when it is complete; only the reading is timed (not
  the wait for a free buffer slot between pieces).
- When an armed deadline passes, or `should_stop()` turns true (checked at least every
  `STOP_POLL_S`), the watchdog calls `shut`: the read's `SourceInterrupt.shut`, which shuts the
  connection down both ways through its duplicate of the socket's fd (a TLS socket's state is never
  touched from this thread), so the reader's blocked read returns at once. `expired` then says it was
  the deadline, so the reader can name the cause instead of "connection closed".
- `close()` ends the watchdog thread; after it nothing is shut down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

STOP_POLL_S = 0.5


class PieceDeadline:
    def __init__(
        self, shut: Callable[[], None], piece_timeout_s: float, should_stop: Callable[[], bool]
    ) -> None:
        """Watch a read whose connection `shut()` ends (from this watchdog's thread)."""
        if not piece_timeout_s > 0:
            raise ValueError(f"piece_timeout_s must be > 0, got {piece_timeout_s}")
        self.piece_timeout_s = piece_timeout_s
        self.expired = False  # the deadline passed (not a stop) and the connection was shut down
        self._shut = shut
        self._should_stop = should_stop
        self._deadline: float | None = None
        self._closed = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="origin-piece-deadline", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        with self._lock:
            self._deadline = time.monotonic() + self.piece_timeout_s

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    self.expired = True
                    break
                if self._should_stop():
                    break
                wait = STOP_POLL_S if self._deadline is None else min(STOP_POLL_S, self._deadline - now)
                self._lock.wait(wait)
            else:
                return
            self._shut()
