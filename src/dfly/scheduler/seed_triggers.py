"""Seed triggers: the DownloadTask call on a seed's control port, over one gRPC channel per seed host that
the engine knows as a connected seed.

Rules:
- a seed host's channel is built by the factory on its first trigger and reused by the next ones while
  `current_address(host_id)` (from the engine: a connected seed's control address, else None) is the
  channel's address; `prune()` (the service calls it after every host event and timer) retires the
  channels of seeds gone, disconnected, no longer seeds or moved, and a trigger at a new address
  retires the old one: the channels are bounded by the connected seeds, however often their pods
  change address;
- a retired channel is closed once no trigger is on it, never under one: closing cancels its calls, and
  a trigger's outcome (accepted, refused, unreachable) must reach the engine as the seed gave it; a
  trigger is bounded by its timeout, so a retired channel outlives its seed by that much at most;
- `trigger` returns the failure to apply (None: the seed accepted) and raises nothing but cancellation;
  `close()` (at stop) closes every channel, and a trigger after it fails at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from grpc import aio

from dfly.api import daemon_pb2_grpc
from dfly.common.errors import DflyError
from dfly.common.net import host_port
from dfly.scheduler import convert
from dfly.scheduler.core.messages import SeedTriggerFailed, TriggerSeedPeer

log = logging.getLogger(__name__)

ChannelFactory = Callable[[str], aio.Channel]
CurrentAddress = Callable[[str], str | None]


@dataclass(slots=True, eq=False)
class _Channel:
    address: str
    channel: aio.Channel
    calls: int = 0  # triggers in flight on it
    retired: bool = False


class SeedTriggers:
    def __init__(self, factory: ChannelFactory, current_address: CurrentAddress, timeout_s: float) -> None:
        self._factory = factory
        self._current_address = current_address
        self._timeout_s = timeout_s
        self._channels: dict[str, _Channel] = {}  # seed host id → its channel
        self._retired: set[_Channel] = set()  # out of _channels, a trigger still on them
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def open_channels(self) -> int:
        """Channels not closed yet: the current seeds', and retired ones a trigger is still on."""
        return len(self._channels) + len(self._retired)

    async def trigger(self, command: TriggerSeedPeer) -> SeedTriggerFailed | None:
        target = host_port(command.seed_ip, command.seed_control_port)
        seed = command.seed_host_id
        try:
            with self._lease(seed, target) as channel:
                stub = daemon_pb2_grpc.DfdaemonControlStub(channel)
                request = convert.download_task_request(command)
                response = await stub.DownloadTask(request, timeout=self._timeout_s)
        except DflyError as exc:  # e.g. a channel that could not be built: the trigger failed, say so
            description = f"seed {seed} at {target}: cannot call DownloadTask: {exc}"
            unreachable = True
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, aio.AioRpcError) else None
            details = exc.details() if isinstance(exc, aio.AioRpcError) else str(exc)
            name = code.name if code is not None else "error"
            description = f"seed {seed} at {target} failed DownloadTask: {name}: {details}"
            unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if "Too many open files" in (details or ""):  # this scheduler had no socket: not the seed's fault
                description = f"{description} (this scheduler is out of file descriptors)"
                unreachable = False
        else:
            if response.accepted:
                return None
            description = f"seed {seed} refused task {command.task_id}"
            unreachable = False
        log.warning("%s", description)
        return SeedTriggerFailed(command.task_id, seed, description, unreachable)

    def prune(self) -> None:
        """Retire the channel of every seed host that is no longer a connected seed at its address."""
        for host_id, entry in list(self._channels.items()):
            if self._current_address(host_id) != entry.address:
                self._retire(host_id)

    async def close(self) -> None:
        self._closed = True
        entries = [*self._channels.values(), *self._retired]
        self._channels.clear()
        self._retired.clear()
        closes = [entry.channel.close(None) for entry in entries]
        await asyncio.gather(*closes, *self._closing, return_exceptions=True)

    @contextmanager
    def _lease(self, host_id: str, target: str) -> Iterator[aio.Channel]:
        if self._closed:
            raise DflyError("the scheduler is stopping")
        entry = self._channels.get(host_id)
        if entry is not None and entry.address != target:
            self._retire(host_id)  # the seed moved: its old address may be anybody's now
            entry = None
        if entry is None:
            entry = self._channels[host_id] = _Channel(target, self._factory(target))
        entry.calls += 1
        try:
            yield entry.channel
        finally:
            entry.calls -= 1
            if self._closed:
                pass  # close() took every channel
            elif not entry.retired:
                if self._current_address(host_id) != target:  # gone while the trigger was on its way
                    self._retire(host_id)
            elif entry.calls == 0 and entry in self._retired:
                self._retired.discard(entry)
                self._close_soon(entry)

    def _retire(self, host_id: str) -> None:
        entry = self._channels.pop(host_id)
        entry.retired = True
        if entry.calls:
            self._retired.add(entry)  # closed by the last trigger on it, when it ends
        else:
            self._close_soon(entry)

    def _close_soon(self, entry: _Channel) -> None:
        task = asyncio.get_running_loop().create_task(entry.channel.close(None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
