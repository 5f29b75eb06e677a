"""Blocking calls that may block for long (an origin read: a whole object, or a silent origin) run in a
thread of their own, not in the event loop's default executor.

Rules:
- The default executor has few workers (min(32, cores + 4)) shared with short urgent work: DNS lookups of
  the proxy and of trusted schedulers, blob hashing, storage joins. Six long reads in it made every one
  of those wait for a whole object.
- The thread is a daemon thread: neither `asyncio.run`'s end nor the interpreter's exit waits for it
  (the caller ends it at a stop, e.g. through a SourceInterrupt).
- The returned future gets the call's result or exception (also the RuntimeError of a thread that
  could not start). Once the future is cancelled, or the loop is closed, the outcome is dropped (no
  "exception was never retrieved" noise).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def in_own_thread(name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
    """Run `fn(*args, **kwargs)` in a new daemon thread called `name`; its outcome lands in the future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]  # value is a T when error is None

    def run() -> None:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (value, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except RuntimeError as exc:  # "can't start new thread": a process or cgroup thread limit
        future.set_exception(exc)  # the caller's error path runs (and gives back what it holds)
    return future
