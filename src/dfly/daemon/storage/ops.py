"""Operations the event loop hands to the storage writer thread, each with the future it resolves.

Rules:
- An operation is created on the event loop, put on the writer's queue and touched by the writer thread
  only after that; the future is resolved on the loop via `call_soon_threadsafe` (`LoopCalls`).
- A `WriteOp` carries the caller's buffer. Whoever flips its state first owns the outcome: the writer
  (`claim`, before it pwrites) or a cancelled caller (`cancel`, before the writer took it). A caller
  whose `cancel` fails must wait for the future before reusing its buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dfly.daemon.storage.model import TaskMeta

_QUEUED, _TAKEN, _CANCELLED = 0, 1, 2


@dataclass(eq=False)
class Op:
    future: asyncio.Future[Any]


@dataclass(eq=False)
class OpenOp(Op):
    """Recover the storage dir; resolves with a RecoveryReport."""


@dataclass(eq=False)
class CreateOp(Op):
    meta: TaskMeta


@dataclass(eq=False)
class FinishOp(Op):
    task_id: str


@dataclass(eq=False)
class DeleteOp(Op):
    task_id: str


@dataclass(eq=False)
class ForgetOp(Op):
    """Drop the records of these pieces (None: every record of the task); resolves (with None) once the
    writer took it, not when durable."""

    task_id: str
    numbers: list[int] | None


@dataclass(eq=False)
class HeadersOp(Op):
    """Replace the task's recorded response headers; resolves once the writer took it."""

    task_id: str
    headers: dict[str, str]


@dataclass(eq=False)
class StopOp(Op):
    clean: bool


@dataclass(eq=False)
class WriteOp(Op):
    task_id: str
    number: int
    offset: int
    data: memoryview | bytes | bytearray | None  # dropped by the writer before the future resolves
    digest: int
    _state: int = _QUEUED
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """Writer side: take the write unless the caller gave it up."""
        with self._lock:
            if self._state != _QUEUED:
                return False
            self._state = _TAKEN
            return True

    def cancel(self) -> bool:
        """Caller side: give the write up; False when the writer has already taken it."""
        with self._lock:
            if self._state != _QUEUED:
                return self._state == _CANCELLED
            self._state = _CANCELLED
            self.data = None
            return True


def settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop (the writer passes it to `call_soon_threadsafe`): resolve `fut` unless it is done."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class LoopCalls:
    """The writer thread's calls onto the event loop: resolving futures and the storage's callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def call(self, callback: Callable[..., object], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    def resolve(self, fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
        self.call(settle, fut, result, exc)

    def resolve_all(self, futures: list[asyncio.Future[Any]], exc: BaseException | None = None) -> None:
        for fut in futures:
            self.resolve(fut, exc=exc)
