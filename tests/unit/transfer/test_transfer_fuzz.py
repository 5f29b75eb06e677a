"""Fuzzing the piece protocol decoder with hypothesis.

Random bytes never raise anything but ProtocolError; a valid stream decodes to the same events however
it is split into reads, through receive_data or through get_buffer/buffer_updated.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from dfly.common.errors import ProtocolError
from dfly.daemon.transfer import protocol as p

PL = 64
CL = 20 * PL + 5  # 21 pieces
COUNT = 21


def new_decoder(role: str) -> p.FrameDecoder:
    if role == "child":
        return p.FrameDecoder("child", piece_length=PL, content_length=CL)
    return p.FrameDecoder("parent")


def decode_all(dec: p.FrameDecoder, chunks: list[bytes], *, eof: bool = True) -> list[p.Event]:
    events: list[p.Event] = []
    for chunk in [*chunks, b""] if eof else chunks:
        dec.receive_data(chunk)
        while not isinstance(event := dec.next_event(), p.NeedData):
            events.append(event)
            if isinstance(event, p.Closed):
                return events
    return events


def merge_bodies(events: list[p.Event]) -> list[p.Event]:
    """Body chunk boundaries depend on the split; join adjacent chunks."""
    merged: list[p.Event] = []
    for event in events:
        if isinstance(event, p.BodyChunk) and merged and isinstance(merged[-1], p.BodyChunk):
            merged[-1] = p.BodyChunk(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


piece_numbers = st.integers(0, COUNT - 1)
child_frames = st.one_of(
    piece_numbers.map(p.encode_have),
    st.tuples(piece_numbers, st.integers(0, 2**32 - 1)).map(lambda t: _piece(*t)),
    st.tuples(st.sampled_from(p.ERROR_CODES), st.text(max_size=20), st.none() | piece_numbers).map(
        lambda t: p.encode_error(*t)
    ),
)
parent_frames = st.one_of(piece_numbers.map(p.encode_request), piece_numbers.map(p.encode_cancel))


def _piece(number: int, digest: int) -> bytes:
    offset, length = p.piece_span(number, PL, CL)
    return p.encode_piece_header(number, offset, length, digest) + bytes(
        (number + i) % 256 for i in range(length)
    )


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[str, bytes]:
    role = draw(st.sampled_from(["child", "parent"]))
    start = p.encode_hello("task", "peer", PL, CL)
    if role == "child":
        have = draw(st.lists(piece_numbers, max_size=COUNT))
        start += p.encode_bitfield(p.make_bitfield(COUNT, have))
        frames = draw(st.lists(child_frames, max_size=12))
    else:
        frames = draw(st.lists(parent_frames, max_size=12))
    return role, start + b"".join(frames)


@settings(max_examples=400)
@given(st.sampled_from(["child", "parent"]), st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_only_raise_protocol_error(role: str, chunks: list[bytes]) -> None:
    try:
        decode_all(new_decoder(role), chunks)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(valid_streams(), st.integers(0, 2**16), st.binary(min_size=1, max_size=32))
def test_corrupted_valid_streams_only_raise_protocol_error(
    stream: tuple[str, bytes], position: int, garbage: bytes
) -> None:
    role, data = stream
    cut = position % (len(data) + 1)
    try:
        decode_all(new_decoder(role), [data[:cut] + garbage + data[cut + len(garbage) :]])
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(valid_streams(), st.lists(st.integers(0, 10_000), max_size=20))
def test_valid_streams_decode_identically_however_split(stream: tuple[str, bytes], cuts: list[int]) -> None:
    role, data = stream
    whole = merge_bodies(decode_all(new_decoder(role), [data]))
    assert whole[0] == p.Hello("task", "peer", PL, CL)
    assert whole[-1] == p.Closed()
    assert merge_bodies(decode_all(new_decoder(role), split(data, cuts))) == whole


@settings(max_examples=200)
@given(valid_streams(), st.lists(st.integers(1, 300), min_size=1, max_size=20))
def test_buffer_protocol_path_matches(stream: tuple[str, bytes], reads: list[int]) -> None:
    """Drive the decoder like client.py does: bodies go straight into the caller's buffer."""
    role, data = stream
    dec = new_decoder(role)
    events: list[p.Event] = []
    bodies: list[bytes] = []
    pos = 0
    turn = 0
    while pos < len(data):
        want = reads[turn % len(reads)]
        turn += 1
        if dec.body_remaining and not dec.buffered:
            n = min(want, dec.body_remaining, len(data) - pos)
            bodies.append(data[pos : pos + n])
            dec.body_received(n)
        else:
            view = dec.get_buffer()
            n = min(want, len(view), len(data) - pos)
            view[:n] = data[pos : pos + n]
            dec.buffer_updated(n)
        pos += n
        while not isinstance(event := dec.next_event(), p.NeedData):
            if isinstance(event, p.BodyChunk):
                bodies.append(event.data)
            else:
                events.append(event)
    expected = decode_all(new_decoder(role), [data], eof=False)
    assert events == [e for e in expected if not isinstance(e, p.BodyChunk)]
    assert b"".join(bodies) == b"".join(e.data for e in expected if isinstance(e, p.BodyChunk))
