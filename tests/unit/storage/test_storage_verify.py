"""corrupt_pieces: re-reading a stored task file names exactly the pieces whose bytes changed."""

from __future__ import annotations

import os
from pathlib import Path

from dfly.common.digest import crc32
from dfly.daemon.storage.verify import corrupt_pieces

PIECE = 1024


def stored(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "task"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def digests_of(data: bytes) -> list[tuple[int, int]]:
    return [(n, crc32(data[off : off + PIECE])) for n, off in enumerate(range(0, len(data), PIECE))]


def test_only_the_changed_pieces_are_named(tmp_path: Path) -> None:
    data = os.urandom(3 * PIECE + 100)  # a short last piece
    pieces = digests_of(data)
    changed = bytearray(data)
    changed[PIECE + 7] ^= 1
    changed[-1] ^= 0x80
    fd = stored(tmp_path, bytes(changed))
    try:
        assert corrupt_pieces(fd, len(data), PIECE, pieces) == [1, 3]
        assert corrupt_pieces(fd, len(data), PIECE, [pieces[0], pieces[2]]) == []  # only those asked
    finally:
        os.close(fd)


def test_pieces_past_the_end_of_a_short_file_are_corrupt(tmp_path: Path) -> None:
    data = os.urandom(4 * PIECE)
    fd = stored(tmp_path, data[: 2 * PIECE + 10])
    try:
        assert corrupt_pieces(fd, len(data), PIECE, digests_of(data)) == [2, 3]
    finally:
        os.close(fd)
