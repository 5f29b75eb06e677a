"""Launch every host's clients on a schedule and time each host: the timing core of the testbed.

Job: `run_staggered` starts host i's clients at t0 + i·S (S = stagger; 0 = all at once, t0 taken just
before the first launch) and returns each host's time measured from that scheduled start, so a late
launch counts against the host (with S = 0 every time is from the common t0).
Rules: a host is done when all its clients have exited with status 0 (exit mode), or, in event mode
(clients that keep running, such as seeding BitTorrent clients), when `Events.expect` completion lines
naming it have arrived on a FIFO; there a client that exits is a failure. Times are stamped with
time.monotonic() when the exit or the line is seen (pidfds and the FIFO in one poll, no sleeps). Every
exited child is reaped; on any failure, or in exit mode, the clients still running are killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .netns import TestbedError, signal_group

Launch = Callable[[int], Sequence["subprocess.Popen[bytes]"]]


@dataclass
class Events:
    """Completion lines on a FIFO: `fd` opened O_RDWR | O_NONBLOCK, `host_of(line)` its host index."""

    fd: int
    host_of: Callable[[str], int | None]
    expect: int  # lines per host


def run_staggered(
    count: int,
    stagger_s: float,
    launch: Launch,
    timeout_s: float,
    *,
    events: Events | None = None,
    describe: Callable[[int], str] = lambda i: f"h{i}",
) -> list[float]:
    """Launch host i at t0 + i·stagger_s; seconds from each host's scheduled start to its completion.

    Raises TestbedError when a client fails (`describe(i)` names host i and may add its log) or when a
    host is not done within timeout_s of its own start (hosts by launch order).
    """
    poller = select.poll()
    if events is not None:
        poller.register(events.fd, select.POLLIN)
    pidfds: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    started: list[subprocess.Popen[bytes]] = []
    pending = [0] * count  # clients (exit mode) or lines (event mode) each host still owes
    ends: list[float | None] = [None] * count
    buf = b""
    t0 = time.monotonic()
    starts = [t0 + i * stagger_s for i in range(count)]
    deadline = starts[-1] + timeout_s
    launched, ok = 0, False

    def finish(i: int, now: float) -> None:
        pending[i] -= 1
        if pending[i] == 0:
            ends[i] = now
        elif pending[i] < 0:
            raise TestbedError(f"{describe(i)}: more completions than clients")

    try:
        while None in ends:
            while launched < count and time.monotonic() >= starts[launched]:
                procs = launch(launched)
                started.extend(procs)
                pending[launched] = events.expect if events is not None else len(procs)
                for proc in procs:
                    fd = os.pidfd_open(proc.pid)
                    pidfds[fd] = (launched, proc)
                    poller.register(fd, select.POLLIN)
                launched += 1
            now = time.monotonic()
            if now > deadline:
                late = [i for i, end in enumerate(ends) if end is None]
                raise TestbedError(f"not done within {timeout_s:g} s of their start: hosts #{late}")
            wake = min(deadline, starts[launched]) if launched < count else deadline
            for fd, _ in poller.poll(max(0.0, wake - now) * 1000 + 1):
                now = time.monotonic()
                if events is not None and fd == events.fd:
                    *lines, buf = (buf + os.read(fd, 65536)).split(b"\n")
                    for line in lines:
                        host = events.host_of(line.decode(errors="replace"))
                        if host is None or host >= launched:
                            raise TestbedError(f"completion line {line!r} names no running host")
                        finish(host, now)
                    continue
                host, proc = pidfds.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                proc.wait()
                if events is not None or proc.returncode != 0:
                    raise TestbedError(f"a client on {describe(host)} exited ({proc.returncode})")
                finish(host, now)
        ok = True
    finally:
        for fd in pidfds:
            os.close(fd)
        if not ok or events is None:
            for proc in started:
                signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
    return [end - start for end, start in zip(ends, starts, strict=True) if end is not None]
