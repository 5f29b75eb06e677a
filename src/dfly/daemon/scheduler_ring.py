"""The daemon's schedulers (`scheduler.addrs`): which one a task talks to, and keeping all of them informed.

Rules:
- Every scheduler gets the host announce (with the tasks held completely) and a keepalive stream; each
  `SchedulerClient` reconnects on its own with capped back-off.
- A task talks to the healthy scheduler (keepalive stream up) with the highest rendezvous weight
  sha256(task id, address): every peer of a task picks the same one, and when one scheduler goes only
  its tasks move. With none healthy, the same rule over all of them (a first try can still succeed).
- When a scheduler's stream breaks, the others are announced to again, so the tasks that move to them
  find the hosts that hold them completely (schedulers share no state).
- `unhealthy_for_s()` says how long no scheduler has been connected (since the ring was made, at
  first), so that a new download waits for one only at the start of an outage (peer_stream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Collection

import grpc

from dfly.daemon.scheduler_client import SchedulerClient

log = logging.getLogger(__name__)


def weight(task_id: str, addr: str) -> bytes:
    """Rendezvous weight of a scheduler for a task: the highest among the healthy ones owns it."""
    return hashlib.sha256(f"{task_id}\0{addr}".encode()).digest()


def owner(task_id: str, addrs: list[str]) -> str:
    return max(addrs, key=lambda addr: weight(task_id, addr))


class SchedulerRing:
    def __init__(self, clients: list[SchedulerClient], clock: Callable[[], float] | None = None) -> None:
        if not clients:
            raise ValueError("at least one scheduler is needed")
        self.clients = clients
        self._changed = asyncio.Event()  # set whenever some client connects
        self._pending: set[asyncio.Task[None]] = set()
        self._clock = clock or asyncio.get_running_loop().time
        self._unhealthy_since: float | None = self._clock()  # None while some scheduler is connected
        for client in clients:
            client.on_connected = self._connected
            client.on_disconnected = self._disconnected

    @property
    def addr(self) -> str:
        return ",".join(client.addr for client in self.clients)

    def healthy(self) -> list[SchedulerClient]:
        return [client for client in self.clients if client.connected.is_set()]

    def unhealthy_for_s(self) -> float:
        """Seconds since the last scheduler was connected (0 while one is)."""
        since = self._unhealthy_since
        return 0.0 if since is None or self.healthy() else self._clock() - since

    def pick(self, task_id: str) -> SchedulerClient:
        """The scheduler for `task_id` (see the module rules)."""
        pool = self.healthy() or self.clients
        return max(pool, key=lambda client: weight(task_id, client.addr))

    async def wait_healthy(self, timeout_s: float | None = None) -> bool:
        """Wait until some scheduler is connected; False after `timeout_s` without one."""
        async with asyncio.timeout(timeout_s):
            while not self.healthy():
                self._changed.clear()
                await self._changed.wait()
        return True

    async def announce_any(self) -> None:
        """Announce to every scheduler; returns once one took it (raises the last error if none did).
        Those still pending are dropped: their keepalive loops announce when they connect."""
        pending = {asyncio.ensure_future(client.announce()) for client in self.clients}
        error: BaseException | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                errors = [attempt.exception() for attempt in done]  # each retrieved, success or not
                if any(e is None for e in errors):
                    return
                error = errors[-1]
        finally:
            for attempt in pending:
                attempt.cancel()
        assert error is not None
        raise error

    async def reannounce(self, only: Collection[str] | None = None) -> None:
        """Tell every connected scheduler again what this host holds, or that it holds tasks `only`
        (best effort)."""
        for client in self.healthy():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await client.announce(only=only)

    def _connected(self) -> None:
        self._unhealthy_since = None
        self._changed.set()

    def _disconnected(self) -> None:
        if not self.healthy() and self._unhealthy_since is None:
            self._unhealthy_since = self._clock()
        self._others_reannounce()

    def _others_reannounce(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reannounce())
        self._pending.add(task)
        task.add_done_callback(self._reannounce_ended)

    def _reannounce_ended(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:  # logged now, not at collection
            log.warning("announcing again to the other schedulers failed: %r", error)

    async def run_keepalive(self) -> None:
        await asyncio.gather(*(client.run_keepalive() for client in self.clients))

    async def leave(self) -> None:
        await asyncio.gather(*(client.leave() for client in self.clients))

    async def delete_task(self, task_id: str) -> None:
        """Tell every scheduler (each may have been told of the task at announce) it is gone here; one
        not connected is told after it reconnects."""
        await asyncio.gather(*(client.delete_task(task_id) for client in self.clients))

    def undelivered_deletes(self) -> int:
        """DeleteTasks some scheduler has not taken yet (scheduler_client.py rules)."""
        return sum(len(client.undelivered) for client in self.clients)

    async def close(self) -> None:
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # ended before the channels close
        await asyncio.gather(*(client.close() for client in self.clients))
