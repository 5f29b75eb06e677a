"""What the clients attached to one download attempt allow it: how long it may run, and whether it may
read the origin.

Rules:
- The attempt runs until the latest deadline of its clients (each client is held to its own by
  tasks.py), and may read the origin if any of them may: the first client's `--timeout` and
  `--disable-back-to-source` must not bind the clients that join it.
- A client joining once the attempt's time is up changes nothing: the attempt is ending, and the next
  request after it starts a new one.
- No clock of its own: the caller passes the loop's time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dfly.common.errors import DownloadTimeout
from dfly.daemon.task_request import TaskRequest


@dataclass
class AttemptTerms:
    started_at: float
    deadline: float
    origin_allowed: bool
    timeout: asyncio.Timeout | None = None

    @classmethod
    def of(cls, request: TaskRequest, now: float) -> AttemptTerms:
        return cls(now, now + request.timeout_s, not request.disable_back_to_source)

    def watch(self) -> asyncio.Timeout:
        """The context manager that ends the attempt at its deadline (moved later as clients join)."""
        self.timeout = asyncio.timeout_at(self.deadline)
        return self.timeout

    def attach(self, request: TaskRequest, now: float) -> None:
        if self.timeout is not None and self.timeout.expired():
            return
        deadline = now + request.timeout_s
        if deadline > self.deadline:
            self.deadline = deadline
            if self.timeout is not None:
                self.timeout.reschedule(deadline)
        if not request.disable_back_to_source:
            self.origin_allowed = True

    def timed_out(self) -> DownloadTimeout:
        return DownloadTimeout(f"download timed out after {self.deadline - self.started_at:g}s")


def client_timed_out(request: TaskRequest) -> DownloadTimeout:
    """One client's own deadline passed (the attempt goes on for the others attached, and the cache)."""
    return DownloadTimeout(f"download timed out after {request.timeout_s:g}s")
