"""The scheduler's end of one AnnouncePeer stream: the queue its handler writes out, in order, and what
each engine command does to it.

Rules:
- a command becomes at most one response on the queue (convert.peer_response); the stream ends after a
  ClosePeer (FAILED_PRECONDITION with its reason), a task failure, or a verdict the peer half-closed for;
- `ended` marks a peer that finished (accepted), failed or was closed: its stream going away is then no
  PeerLeft; a rejected verdict keeps the peer running (it fetches the bad pieces again).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from dfly.api import scheduler_pb2 as pb
from dfly.scheduler import convert
from dfly.scheduler.core.messages import ClosePeer, Command, SendFinishVerdict, SendTaskFailed


@dataclass(frozen=True, slots=True)
class EndStream:
    """Queue item: end the AnnouncePeer stream, with an error status when `code` is set."""

    code: grpc.StatusCode | None = None
    details: str = ""


@dataclass(slots=True, eq=False)
class PeerStream:
    queue: asyncio.Queue[pb.AnnouncePeerResponse | EndStream] = field(default_factory=asyncio.Queue)
    peer_id: str | None = None
    ended: bool = False  # finished (accepted), failed or closed: no PeerLeft when the stream goes
    awaiting_verdict: bool = False
    close_after_verdict: bool = False

    def end(self, code: grpc.StatusCode | None = None, details: str = "") -> None:
        self.queue.put_nowait(EndStream(code, details))

    def deliver(self, command: Command) -> None:
        """The engine's command for this stream's peer, as a response or the stream's end."""
        if isinstance(command, ClosePeer):
            self.ended = True
            self.end(grpc.StatusCode.FAILED_PRECONDITION, command.reason)
            return
        response = convert.peer_response(command)
        if response is not None:
            self.queue.put_nowait(response)
        if isinstance(command, SendTaskFailed):
            self.ended = True
            self.end()
        elif isinstance(command, SendFinishVerdict):
            self.awaiting_verdict = False
            self.ended = command.accepted
            if self.close_after_verdict:
                self.end()
