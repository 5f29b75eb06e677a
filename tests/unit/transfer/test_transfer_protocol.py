"""Piece protocol codec: round trips, body handling, and a table of malformed inputs."""

from __future__ import annotations

import json
import struct

import pytest

from dfly.common.errors import ProtocolError
from dfly.daemon.transfer import protocol as p

PL = 1024
CL = 10 * PL + 100  # 11 pieces, the last one 100 bytes
COUNT = 11


def child_decoder() -> p.FrameDecoder:
    return p.FrameDecoder("child", piece_length=PL, content_length=CL)


def hello() -> bytes:
    return p.encode_hello("task-1", "peer-1", PL, CL)


def drain(dec: p.FrameDecoder) -> list[p.Event]:
    events: list[p.Event] = []
    while not isinstance(event := dec.next_event(), p.NeedData):
        events.append(event)
        if isinstance(event, p.Closed):
            break
    return events


def frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", kind, len(payload) if length is None else length) + payload


def test_child_round_trip() -> None:
    dec = child_decoder()
    bits = p.make_bitfield(COUNT, [0, 3, 10])
    body = bytes(range(100))
    dec.receive_data(
        hello()
        + p.encode_bitfield(bits)
        + p.encode_have(5)
        + p.encode_piece_header(10, 10 * PL, 100, 1234)
        + body
        + p.encode_error("not_available", "nope", piece=4)
        + p.encode_error("shutdown", "bye")
    )
    dec.receive_data(b"")
    events = drain(dec)
    assert events == [
        p.Hello("task-1", "peer-1", PL, CL),
        p.Bitfield(bytes(bits)),
        p.Have(5),
        p.PieceHeader(10, 10 * PL, 100, 1234),
        p.BodyChunk(body),
        p.PieceEnd(10),
        p.Error("not_available", "nope", 4),
        p.Error("shutdown", "bye", None),
        p.Closed(),
    ]
    assert p.bitfield_pieces(bits, COUNT) == [0, 3, 10]


def test_parent_adopts_layout_and_decodes_requests() -> None:
    dec = p.FrameDecoder("parent")
    dec.receive_data(hello() + p.encode_request(0) + p.encode_cancel(10) + p.encode_request(3))
    assert drain(dec) == [p.Hello("task-1", "peer-1", PL, CL), p.Request(0), p.Cancel(10), p.Request(3)]
    assert (dec.piece_length, dec.content_length, dec.piece_count) == (PL, CL, COUNT)


def test_body_received_directly_into_caller_buffer() -> None:
    dec = child_decoder()
    dec.receive_data(
        hello() + p.encode_bitfield(p.make_bitfield(COUNT)) + p.encode_piece_header(2, 2 * PL, PL, 7)
    )
    assert drain(dec)[-1] == p.PieceHeader(2, 2 * PL, PL, 7)
    assert dec.body_remaining == PL
    assert dec.buffered == 0
    dec.body_received(PL - 1)
    assert dec.next_event() is p.NEED_DATA
    dec.body_received(1)
    assert dec.next_event() == p.PieceEnd(2)
    dec.receive_data(p.encode_have(1))
    assert drain(dec) == [p.Have(1)]


def test_get_buffer_path_and_compaction() -> None:
    dec = p.FrameDecoder("parent")
    stream = hello() + b"".join(p.encode_request(i % COUNT) for i in range(20_000))
    events: list[p.Event] = []
    pos = 0
    while pos < len(stream):
        view = dec.get_buffer()
        n = min(len(view), 7_777, len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        events.extend(drain(dec))
    assert len(events) == 20_001
    assert events[-1] == p.Request(19_999 % COUNT)


def test_bitfield_helpers() -> None:
    assert p.make_bitfield(9, [0, 8]) == bytearray([0x80, 0x80])
    assert p.bitfield_pieces(bytes([0xFF, 0x80]), 9) == list(range(9))
    assert p.make_bitfield(0) == bytearray()
    with pytest.raises(ValueError, match="out of range"):
        p.make_bitfield(9, [9])
    with pytest.raises(ProtocolError, match="spare"):
        p.bitfield_pieces(bytes([0xFF, 0xC0]), 9)
    with pytest.raises(ProtocolError, match="bytes"):
        p.bitfield_pieces(bytes([0xFF]), 9)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", "peer", PL, CL), "1..256"),
        (("t" * 257, "peer", PL, CL), "1..256"),
        (("t", "peer", 0, CL), "layout"),
        (("t", "peer", PL, -1), "layout"),
        (("t", "peer", 1, p.MAX_PIECE_COUNT + 1), "pieces"),
    ],
)
def test_encode_hello_rejects(args: tuple[str, str, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        p.encode_hello(*args)


def test_other_encoders_reject() -> None:
    with pytest.raises(ValueError, match="out of range"):
        p.encode_request(-1)
    with pytest.raises(ValueError, match="out of range"):
        p.encode_have(2**32)
    with pytest.raises(ValueError, match="bad piece header"):
        p.encode_piece_header(0, 0, 0, 0)
    with pytest.raises(ValueError, match="exceeds"):
        p.encode_bitfield(bytes(p.MAX_CONTROL_PAYLOAD + 1))


def _json(kind: int, obj: object) -> bytes:
    return frame(kind, json.dumps(obj).encode())


GOOD_HELLO = {"version": 1, "task_id": "t", "peer_id": "x", "piece_length": PL, "content_length": CL}
OPEN = hello() + p.encode_bitfield(p.make_bitfield(COUNT))  # a child decoder past the handshake

# (name, role, bytes) — each must raise ProtocolError (possibly only at EOF).
MALFORMED: list[tuple[str, str, bytes]] = [
    ("unknown type", "child", frame(9, b"")),
    ("type zero", "parent", frame(0, b"")),
    ("oversized control frame", "child", frame(p.HELLO, b"", p.MAX_CONTROL_PAYLOAD + 1)),
    ("request toward child", "child", OPEN + p.encode_request(1)),
    ("piece toward parent", "parent", hello() + p.encode_piece_header(0, 0, PL, 0)),
    ("bitfield toward parent", "parent", hello() + p.encode_bitfield(p.make_bitfield(COUNT))),
    ("have before hello", "child", p.encode_have(1)),
    ("request before hello", "parent", p.encode_request(1)),
    ("have before bitfield", "child", hello() + p.encode_have(1)),
    ("second hello", "child", OPEN + hello()),
    ("second bitfield", "child", OPEN + p.encode_bitfield(p.make_bitfield(COUNT))),
    ("hello not json", "child", frame(p.HELLO, b"{nope")),
    ("hello not utf-8", "child", frame(p.HELLO, b"\xff\xfe")),
    ("hello json array", "child", _json(p.HELLO, [1, 2])),
    ("hello deeply nested", "child", frame(p.HELLO, b"[" * 60_000)),
    ("hello huge int", "child", frame(p.HELLO, b'{"version": ' + b"9" * 5000 + b"}")),
    ("hello missing field", "child", _json(p.HELLO, {k: v for k, v in GOOD_HELLO.items() if k != "peer_id"})),
    ("hello wrong version", "child", _json(p.HELLO, {**GOOD_HELLO, "version": 2})),
    ("hello bool version", "child", _json(p.HELLO, {**GOOD_HELLO, "version": True})),
    ("hello str piece_length", "child", _json(p.HELLO, {**GOOD_HELLO, "piece_length": "1024"})),
    ("hello float length", "child", _json(p.HELLO, {**GOOD_HELLO, "content_length": 1.5})),
    ("hello zero piece_length", "parent", _json(p.HELLO, {**GOOD_HELLO, "piece_length": 0})),
    ("hello negative length", "parent", _json(p.HELLO, {**GOOD_HELLO, "content_length": -1})),
    (
        "hello too many pieces",
        "parent",
        _json(p.HELLO, {**GOOD_HELLO, "piece_length": 1, "content_length": 2**20}),
    ),
    ("hello empty task", "parent", _json(p.HELLO, {**GOOD_HELLO, "task_id": ""})),
    ("hello long peer", "parent", _json(p.HELLO, {**GOOD_HELLO, "peer_id": "p" * 300})),
    ("hello other layout", "child", _json(p.HELLO, {**GOOD_HELLO, "piece_length": 2 * PL})),
    ("bitfield short", "child", hello() + frame(p.BITFIELD, b"\xff")),
    ("bitfield long", "child", hello() + frame(p.BITFIELD, b"\xff\xe0\x00")),
    ("bitfield spare bits", "child", hello() + frame(p.BITFIELD, b"\xff\xf0")),
    ("have short", "child", OPEN + frame(p.HAVE, b"\x00\x00\x01")),
    ("have long", "child", OPEN + frame(p.HAVE, b"\x00\x00\x00\x01\x00")),
    ("have out of range", "child", OPEN + p.encode_have(COUNT)),
    ("request out of range", "parent", hello() + p.encode_request(COUNT)),
    ("cancel out of range", "parent", hello() + p.encode_cancel(2**32 - 1)),
    ("piece short header", "child", OPEN + frame(p.PIECE, bytes(19))),
    ("piece out of range", "child", OPEN + p.encode_piece_header(COUNT, COUNT * PL, PL, 0)),
    ("piece wrong offset", "child", OPEN + p.encode_piece_header(1, 0, PL, 0)),
    ("piece wrong length", "child", OPEN + p.encode_piece_header(10, 10 * PL, PL, 0)),
    ("error not json", "child", frame(p.ERROR, b"\x00")),
    ("error no code", "child", _json(p.ERROR, {"message": "m"})),
    ("error int message", "child", _json(p.ERROR, {"code": "x", "message": 5})),
    ("error negative piece", "child", _json(p.ERROR, {"code": "x", "message": "m", "piece": -1})),
    ("error str piece", "child", _json(p.ERROR, {"code": "x", "message": "m", "piece": "1"})),
    ("eof mid header", "child", OPEN + p.encode_have(1)[:3]),
    ("eof mid payload", "child", OPEN + p.encode_have(1)[:7]),
    ("eof mid body", "child", OPEN + p.encode_piece_header(0, 0, PL, 0) + bytes(10)),
]


@pytest.mark.parametrize(("name", "role", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_raises_protocol_error(name: str, role: str, data: bytes) -> None:
    dec = child_decoder() if role == "child" else p.FrameDecoder("parent")
    dec.receive_data(data)
    dec.receive_data(b"")
    with pytest.raises(ProtocolError):
        drain(dec)
    with pytest.raises(ProtocolError):  # poisoned: the same error again
        dec.next_event()


def test_error_without_hello_is_allowed() -> None:
    dec = child_decoder()
    dec.receive_data(p.encode_error("unknown_task", "no such task"))
    assert drain(dec) == [p.Error("unknown_task", "no such task")]


def test_hello_extra_fields_are_ignored() -> None:
    dec = p.FrameDecoder("parent")
    dec.receive_data(_json(p.HELLO, {**GOOD_HELLO, "future": [1, 2]}))
    assert drain(dec) == [p.Hello("t", "x", PL, CL)]


def test_empty_task_layout() -> None:
    dec = p.FrameDecoder("child", piece_length=PL, content_length=0)
    dec.receive_data(p.encode_hello("t", "x", PL, 0) + p.encode_bitfield(b""))
    assert drain(dec) == [p.Hello("t", "x", PL, 0), p.Bitfield(b"")]
