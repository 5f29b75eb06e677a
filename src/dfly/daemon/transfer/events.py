"""Typed events of the piece protocol decoder (`protocol.FrameDecoder.next_event`).

Frozen dataclasses with slots, one per thing the decoder can report; `NEED_DATA` means "feed me more".
Re-exported by `protocol`, which is where callers import them from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Hello:
    task_id: str
    peer_id: str
    piece_length: int
    content_length: int


@dataclass(frozen=True, slots=True)
class Bitfield:
    bits: bytes


@dataclass(frozen=True, slots=True)
class Have:
    number: int


@dataclass(frozen=True, slots=True)
class Request:
    number: int


@dataclass(frozen=True, slots=True)
class Cancel:
    number: int


@dataclass(frozen=True, slots=True)
class PieceHeader:
    number: int
    offset: int
    length: int
    digest: int


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Piece bytes the decoder already held when the body began (copied out of its buffer)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PieceEnd:
    number: int


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str
    piece: int | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed cleanly (EOF on a frame boundary)."""


class NeedData:
    """Sentinel type: no complete event yet."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
Event = Hello | Bitfield | Have | Request | Cancel | PieceHeader | BodyChunk | PieceEnd | Error | Closed
