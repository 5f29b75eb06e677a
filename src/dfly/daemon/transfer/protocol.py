"""Sans-IO codec of the piece protocol (docs/architecture.md, "Piece protocol").

Encoders turn values into frame bytes; `FrameDecoder` turns received bytes into typed events. No sockets,
no event loop, no clock: the I/O layers (`server.py`, `client.py`) own the sockets and drive this module.

Rules:
- Everything received is validated; any violation raises `ProtocolError` and poisons the decoder (every
  later call raises the same error). Nothing else escapes the decoder, whatever the bytes.
- A PIECE frame's payload is its 20-byte header; the piece's raw bytes follow the frame. After the
  `PieceHeader` event the decoder is in body mode: bytes it already holds come out as `BodyChunk` events,
  and while it holds none the caller may receive up to `body_remaining` bytes straight into its own buffer
  and report them with `body_received(n)`. `PieceEnd` closes the body either way.
- The decoder owns a fixed receive buffer that is never resized in place (so a memoryview handed out by
  `get_buffer` may outlive the call); growing or compacting allocates a new one.
- Encoders reject out-of-range arguments with ValueError (a local bug, not a peer's).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any, Final, Literal

from dfly.common.errors import ProtocolError
from dfly.daemon.transfer.events import (
    NEED_DATA,
    Bitfield,
    BodyChunk,
    Cancel,
    Closed,
    Error,
    Event,
    Have,
    Hello,
    NeedData,
    PieceEnd,
    PieceHeader,
    Request,
)

__all__ = [
    "NEED_DATA", "Bitfield", "BodyChunk", "Cancel", "Closed", "Error", "Event", "FrameDecoder", "Have",
    "Hello", "NeedData", "PieceEnd", "PieceHeader", "Request", "bitfield_pieces", "encode_bitfield",
    "encode_cancel", "encode_error", "encode_have", "encode_hello", "encode_piece_header",
    "encode_request", "make_bitfield",
]  # fmt: skip

HELLO: Final = 1
BITFIELD: Final = 2
HAVE: Final = 3
REQUEST: Final = 4
CANCEL: Final = 5
PIECE: Final = 6
ERROR: Final = 7
FRAME_NAMES: Final = {
    HELLO: "HELLO", BITFIELD: "BITFIELD", HAVE: "HAVE", REQUEST: "REQUEST",
    CANCEL: "CANCEL", PIECE: "PIECE", ERROR: "ERROR",
}  # fmt: skip

VERSION: Final = 1
MAX_CONTROL_PAYLOAD: Final = 65_536
MAX_PIECE_COUNT: Final = MAX_CONTROL_PAYLOAD * 8  # a BITFIELD must fit one control frame
MAX_ID_CHARS: Final = 256
ERROR_CODES: Final = (
    "unknown_task", "layout_mismatch", "not_available", "bad_frame", "busy", "shutdown", "corrupt_piece"
)  # fmt: skip

_FRAME = struct.Struct(">BI")
_NUMBER = struct.Struct(">I")
_PIECE = struct.Struct(">IQII")
FRAME_HEADER_SIZE: Final = _FRAME.size  # 5
PIECE_HEADER_SIZE: Final = _PIECE.size  # 20
_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF
_BUFFER_SIZE: Final = 2 * (FRAME_HEADER_SIZE + MAX_CONTROL_PAYLOAD)

Role = Literal["parent", "child"]
# Frame types each side may receive (i.e. the other side may send).
_ACCEPTS: Final[dict[str, frozenset[int]]] = {
    "child": frozenset({HELLO, BITFIELD, HAVE, PIECE, ERROR}),
    "parent": frozenset({HELLO, REQUEST, CANCEL, ERROR}),
}


# -------------------------------------------------------------------------------------------- encoders
def _frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"{FRAME_NAMES[kind]} payload of {len(payload)} bytes exceeds {MAX_CONTROL_PAYLOAD}")
    return _FRAME.pack(kind, len(payload)) + payload


def _number(kind: int, number: int) -> bytes:
    if not 0 <= number <= _U32:
        raise ValueError(f"piece number {number} out of range")
    return _FRAME.pack(kind, 4) + _NUMBER.pack(number)


def piece_count_of(piece_length: int, content_length: int) -> int:
    return -(-content_length // piece_length)


def piece_span(number: int, piece_length: int, content_length: int) -> tuple[int, int]:
    """(offset, length) of piece `number` (the last piece is shorter)."""
    offset = number * piece_length
    return offset, min(piece_length, content_length - offset)


def check_layout(piece_length: int, content_length: int) -> None:
    if not 0 < piece_length <= _U32 or not 0 <= content_length <= _U64 >> 1:
        raise ValueError(f"bad layout: piece_length={piece_length} content_length={content_length}")
    if piece_count_of(piece_length, content_length) > MAX_PIECE_COUNT:
        raise ValueError(f"layout has more than {MAX_PIECE_COUNT} pieces")


def encode_hello(task_id: str, peer_id: str, piece_length: int, content_length: int) -> bytes:
    check_layout(piece_length, content_length)
    if not 0 < len(task_id) <= MAX_ID_CHARS or not 0 < len(peer_id) <= MAX_ID_CHARS:
        raise ValueError("task_id and peer_id must be 1..256 characters")
    body = {"version": VERSION, "task_id": task_id, "peer_id": peer_id,
            "piece_length": piece_length, "content_length": content_length}  # fmt: skip
    return _frame(HELLO, json.dumps(body, separators=(",", ":")).encode())


def encode_bitfield(bits: bytes | bytearray) -> bytes:
    return _frame(BITFIELD, bytes(bits))


def encode_have(number: int) -> bytes:
    return _number(HAVE, number)


def encode_request(number: int) -> bytes:
    return _number(REQUEST, number)


def encode_cancel(number: int) -> bytes:
    return _number(CANCEL, number)


def encode_piece_header(number: int, offset: int, length: int, digest: int) -> bytes:
    if not (0 <= number <= _U32 and 0 <= offset <= _U64 and 0 < length <= _U32 and 0 <= digest <= _U32):
        raise ValueError(f"bad piece header {number=} {offset=} {length=} {digest=}")
    return _FRAME.pack(PIECE, PIECE_HEADER_SIZE) + _PIECE.pack(number, offset, length, digest)


def encode_error(code: str, message: str, piece: int | None = None) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message[:1024]}
    if piece is not None:
        body["piece"] = piece
    return _frame(ERROR, json.dumps(body, separators=(",", ":")).encode())


# ------------------------------------------------------------------------------------------- bitfields
def make_bitfield(piece_count: int, have: Iterable[int] = ()) -> bytearray:
    """Bit i (MSB first in each byte) set for every piece i in `have`."""
    bits = bytearray((piece_count + 7) // 8)
    for number in have:
        set_bit(bits, piece_count, number)
    return bits


def set_bit(bits: bytearray, piece_count: int, number: int) -> None:
    if not 0 <= number < piece_count:
        raise ValueError(f"piece {number} out of range for {piece_count} pieces")
    bits[number >> 3] |= 0x80 >> (number & 7)


def has_bit(bits: bytes | bytearray, number: int) -> bool:
    return 0 <= number < len(bits) * 8 and bool(bits[number >> 3] & (0x80 >> (number & 7)))


def bitfield_pieces(bits: bytes | bytearray, piece_count: int) -> list[int]:
    """Piece numbers set in a received bitfield; ProtocolError on a wrong length or spare bits set."""
    if len(bits) != (piece_count + 7) // 8:
        raise ProtocolError(f"bitfield of {len(bits)} bytes for {piece_count} pieces")
    spare = (-piece_count) % 8
    if spare and bits[-1] & ((1 << spare) - 1):
        raise ProtocolError("bitfield has spare bits set")
    pieces: list[int] = []
    for index, byte in enumerate(bits):
        if byte:
            base = index * 8
            pieces.extend(base + bit for bit in range(8) if byte & (0x80 >> bit))
    return pieces


# --------------------------------------------------------------------------------------------- decoder
def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what}: invalid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: JSON payload is not an object")
    return value


def _field_int(obj: dict[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what}: field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def _field_str(obj: dict[str, Any], key: str, what: str, max_chars: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > max_chars:
        raise ProtocolError(f"{what}: field {key!r} must be a string of at most {max_chars} characters")
    return value


class FrameDecoder:
    """Decodes the frames one side receives. `role` is this side: "child" receives the parent's frames.

    A child knows the layout from the start (pass it); a parent adopts the layout of the child's HELLO.
    """

    def __init__(self, role: Role, *, piece_length: int | None = None, content_length: int | None = None):
        self.role: Role = role
        self._accepts = _ACCEPTS[role]
        self.piece_length = piece_length
        self.content_length = content_length
        self.piece_count: int | None = None
        if piece_length is not None and content_length is not None:
            check_layout(piece_length, content_length)
            self.piece_count = piece_count_of(piece_length, content_length)
        self._state = "hello"  # hello -> (child: bitfield ->) open
        self._buf = bytearray(_BUFFER_SIZE)
        self._start = 0
        self._end = 0
        self._eof = False
        self._failed: ProtocolError | None = None
        self._body_remaining = 0
        self._body_number = -1
        self._end_pending = False

    # -- input
    def get_buffer(self) -> memoryview:
        """Writable space at the end of the receive buffer; report what was filled with buffer_updated."""
        held = self._end - self._start
        if not held:
            self._start = self._end = 0
        elif len(self._buf) - self._end < FRAME_HEADER_SIZE + MAX_CONTROL_PAYLOAD:
            fresh = bytearray(max(_BUFFER_SIZE, held + _BUFFER_SIZE // 2))
            fresh[:held] = self._buf[self._start : self._end]
            self._buf, self._start, self._end = fresh, 0, held
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"buffer_updated({nbytes}) beyond the buffer")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; b"" means EOF."""
        if not data:
            self._eof = True
            return
        if len(self._buf) - self._end < len(data):
            held = self._end - self._start
            fresh = bytearray(max(_BUFFER_SIZE, held + len(data)))
            fresh[:held] = self._buf[self._start : self._end]
            self._buf, self._start, self._end = fresh, 0, held
        self._buf[self._end : self._end + len(data)] = data
        self._end += len(data)

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def body_remaining(self) -> int:
        """Raw piece bytes still expected for the current PIECE (0 outside a body)."""
        return self._body_remaining

    def body_received(self, nbytes: int) -> None:
        """The caller received `nbytes` of body straight into its own buffer (only while nothing is held)."""
        if self.buffered or not 0 < nbytes <= self._body_remaining:
            raise ValueError(f"body_received({nbytes}) with {self.buffered} held, {self._body_remaining} due")
        self._body_remaining -= nbytes
        self._end_pending = self._body_remaining == 0

    # -- output
    def next_event(self) -> Event | NeedData:
        if self._failed is not None:
            raise self._failed
        try:
            return self._next()
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _next(self) -> Event | NeedData:
        if self._end_pending:
            self._end_pending = False
            return PieceEnd(self._body_number)
        held = self._end - self._start
        if self._body_remaining:
            if not held:
                return self._starved()
            take = min(held, self._body_remaining)
            chunk = bytes(self._buf[self._start : self._start + take])
            self._start += take
            self._body_remaining -= take
            self._end_pending = self._body_remaining == 0
            return BodyChunk(chunk)
        if held < FRAME_HEADER_SIZE:
            return self._starved()
        kind, length = _FRAME.unpack_from(self._buf, self._start)
        self._check_header(kind, length)
        if held < FRAME_HEADER_SIZE + length:
            return self._starved()
        begin = self._start + FRAME_HEADER_SIZE
        payload = bytes(self._buf[begin : begin + length])
        self._start = begin + length
        return self._dispatch(kind, payload)

    def _starved(self) -> NeedData | Closed:
        if not self._eof:
            return NEED_DATA
        if self.buffered or self._body_remaining:
            raise ProtocolError("connection closed in the middle of a frame")
        return Closed()

    def _check_header(self, kind: int, length: int) -> None:
        name = FRAME_NAMES.get(kind)
        if name is None:
            raise ProtocolError(f"unknown frame type {kind}")
        if kind not in self._accepts:
            raise ProtocolError(f"{name} frame not allowed toward the {self.role}")
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError(f"{name} frame of {length} bytes exceeds {MAX_CONTROL_PAYLOAD}")
        fixed = {HAVE: 4, REQUEST: 4, CANCEL: 4, PIECE: PIECE_HEADER_SIZE}.get(kind)
        if fixed is not None and length != fixed:
            raise ProtocolError(f"{name} payload must be {fixed} bytes, got {length}")
        if kind != ERROR:
            expected = {"hello": HELLO, "bitfield": BITFIELD}.get(self._state)
            if expected is not None and kind != expected:
                raise ProtocolError(f"expected {FRAME_NAMES[expected]}, got {name}")
            if expected is None and kind in (HELLO, BITFIELD):
                raise ProtocolError(f"unexpected second {name}")

    def _dispatch(self, kind: int, payload: bytes) -> Event:
        if kind == HELLO:
            return self._hello(payload)
        if kind == ERROR:
            return self._error(payload)
        assert self.piece_count is not None
        if kind == BITFIELD:
            bitfield_pieces(payload, self.piece_count)  # validates length and spare bits
            self._state = "open"
            return Bitfield(payload)
        if kind == PIECE:
            return self._piece(payload)
        (number,) = _NUMBER.unpack(payload)
        if number >= self.piece_count:
            raise ProtocolError(f"{FRAME_NAMES[kind]} for piece {number} of {self.piece_count}")
        return Have(number) if kind == HAVE else Request(number) if kind == REQUEST else Cancel(number)

    def _hello(self, payload: bytes) -> Hello:
        obj = _json_object(payload, "HELLO")
        if obj.get("version") != VERSION or type(obj.get("version")) is not int:
            raise ProtocolError(f"HELLO: unsupported version {obj.get('version')!r}")
        task_id = _field_str(obj, "task_id", "HELLO", MAX_ID_CHARS)
        peer_id = _field_str(obj, "peer_id", "HELLO", MAX_ID_CHARS)
        if not task_id or not peer_id:
            raise ProtocolError("HELLO: empty task_id or peer_id")
        piece_length = _field_int(obj, "piece_length", "HELLO", 1, _U32)
        content_length = _field_int(obj, "content_length", "HELLO", 0, _U64 >> 1)
        if piece_count_of(piece_length, content_length) > MAX_PIECE_COUNT:
            raise ProtocolError(f"HELLO: layout has more than {MAX_PIECE_COUNT} pieces")
        if self.piece_length is None:
            self.piece_length, self.content_length = piece_length, content_length
            self.piece_count = piece_count_of(piece_length, content_length)
        elif (piece_length, content_length) != (self.piece_length, self.content_length):
            raise ProtocolError(f"HELLO: layout {piece_length}/{content_length} differs from ours")
        self._state = "bitfield" if self.role == "child" else "open"
        return Hello(task_id, peer_id, piece_length, content_length)

    def _error(self, payload: bytes) -> Error:
        obj = _json_object(payload, "ERROR")
        code = _field_str(obj, "code", "ERROR", 64)
        message = _field_str(obj, "message", "ERROR", MAX_CONTROL_PAYLOAD)
        piece = None if obj.get("piece") is None else _field_int(obj, "piece", "ERROR", 0, _U32)
        return Error(code, message, piece)

    def _piece(self, payload: bytes) -> PieceHeader:
        assert self.piece_count is not None
        assert self.piece_length is not None
        assert self.content_length is not None
        number, offset, length, digest = _PIECE.unpack(payload)
        if number >= self.piece_count:
            raise ProtocolError(f"PIECE {number} of {self.piece_count}")
        if (offset, length) != piece_span(number, self.piece_length, self.content_length):
            raise ProtocolError(f"PIECE {number}: offset {offset} / length {length} do not match the layout")
        self._body_remaining, self._body_number = length, number
        return PieceHeader(number, offset, length, digest)
