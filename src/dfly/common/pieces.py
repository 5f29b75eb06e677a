"""Piece layout rules (DESIGN.md §3): default length, user-fixed lengths, piece ranges, size parsing.

Default piece length: the largest power of two ≤ content_length / 256, clamped to [256 KiB, 16 MiB], so a
file of 64 MiB to 4 GiB has 256–511 pieces and one of 16–64 MiB 64–256 (DESIGN says "≥ content_length /
64"; measured in the swarm benchmark, smaller pieces cut the time for the last pieces to cross the swarm:
8 hosts × 64 MiB × 100 Mbit/s went from 1.30–1.38 × T_min with 1 MiB pieces to 1.16–1.30 with 256 KiB.
docs/architecture.md, docs/benchmarks.md). A 1 GiB file gets 4 MiB pieces, as in Dragonfly.
User-fixed lengths: powers of two in [64 KiB, 64 MiB].
A layout received from the network (scheduler, peer, seed trigger) is valid when its piece length is
such a power of two and it has at most MAX_PIECE_COUNT pieces (a 2 MiB bitmap); anything else is
refused before a bitmap or a file is sized from it.
"""

from __future__ import annotations

import re

from dfly.common.errors import UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MIN_DEFAULT_PIECE_LENGTH = 256 * KiB
MAX_DEFAULT_PIECE_LENGTH = 16 * MiB
MIN_USER_PIECE_LENGTH = 64 * KiB
MAX_USER_PIECE_LENGTH = 64 * MiB
TARGET_PIECE_COUNT = 256
MAX_PIECE_COUNT = 1 << 24


def _power_of_two_at_most(n: int) -> int:
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)


def default_piece_length(content_length: int) -> int:
    wanted = _power_of_two_at_most(content_length // TARGET_PIECE_COUNT)
    return max(MIN_DEFAULT_PIECE_LENGTH, min(MAX_DEFAULT_PIECE_LENGTH, wanted))


def validate_user_piece_length(length: int) -> int:
    if length < MIN_USER_PIECE_LENGTH or length > MAX_USER_PIECE_LENGTH or length & (length - 1):
        raise UsageError(f"piece length {length} must be a power of two between 64KiB and 64MiB")
    return length


def validate_layout(content_length: int, piece_length: int) -> None:
    """Raise UsageError unless (content_length, piece_length) is a layout dfly could have made."""
    if (
        piece_length < MIN_USER_PIECE_LENGTH
        or piece_length > MAX_USER_PIECE_LENGTH
        or piece_length & (piece_length - 1)
    ):
        raise UsageError(f"invalid layout: piece length {piece_length} is not a power of two in 64KiB-64MiB")
    if content_length < 0 or piece_count(content_length, piece_length) > MAX_PIECE_COUNT:
        raise UsageError(
            f"invalid layout: {content_length} bytes in pieces of {piece_length} "
            f"(at most {MAX_PIECE_COUNT} pieces)"
        )


def piece_count(content_length: int, piece_length: int) -> int:
    return -(-content_length // piece_length)


def piece_range(number: int, piece_length: int, content_length: int) -> tuple[int, int]:
    """(offset, length) of piece `number`; the last piece is shorter."""
    offset = number * piece_length
    if number < 0 or offset >= content_length:
        raise ValueError(f"piece {number} out of range for {content_length} bytes")
    return offset, min(piece_length, content_length - offset)


_SIZE = re.compile(r"^\s*(\d{1,19})\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB}  # fmt: skip


def parse_size(text: str) -> int:
    """'4MiB', '512k', '1048576' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise UsageError(f"invalid size {shown!r} (e.g. 4MiB, 512KiB, 1048576)")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
