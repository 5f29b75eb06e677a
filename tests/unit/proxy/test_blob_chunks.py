"""`chunk_end`: how far one read of the mirror's response reaches (proxy/blob.py)."""

from __future__ import annotations

from dfly.daemon.proxy.blob import CHUNK_BYTES, chunk_end

KiB = 1024
PL = 256 * KiB


def test_a_lone_ready_piece_is_one_chunk() -> None:
    assert chunk_end(0, 10 * PL, 10 * PL, PL, {0, 2}) == PL


def test_following_ready_pieces_join_up_to_the_chunk_limit() -> None:
    per_chunk = CHUNK_BYTES // PL
    ready = set(range(3 * per_chunk))
    assert chunk_end(0, 3 * per_chunk * PL, 3 * per_chunk * PL, PL, ready) == CHUNK_BYTES
    assert chunk_end(PL, 3 * per_chunk * PL, 3 * per_chunk * PL, PL, ready) == PL + CHUNK_BYTES


def test_a_missing_piece_ends_the_chunk() -> None:
    assert chunk_end(0, 10 * PL, 10 * PL, PL, {0, 1, 2, 4, 5}) == 3 * PL


def test_the_short_last_piece_ends_at_the_object() -> None:
    size = 3 * PL + 100
    assert chunk_end(0, size, size, PL, {0, 1, 2, 3}) == size


def test_a_range_stops_at_the_piece_holding_its_last_byte() -> None:
    size = 10 * PL
    ready = set(range(10))
    assert chunk_end(0, size, 2 * PL + 1, PL, ready) == 3 * PL  # byte 2·PL is in piece 2
    assert chunk_end(0, size, 2 * PL, PL, ready) == 2 * PL


def test_a_piece_larger_than_the_limit_is_one_chunk() -> None:
    big = 2 * CHUNK_BYTES
    assert chunk_end(0, 4 * big, 4 * big, big, {0, 1, 2, 3}) == big
