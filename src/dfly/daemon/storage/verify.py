"""Re-read a stored task file and name the pieces whose bytes no longer match their recorded CRC-32.

Used by stored_check.py: for a task held from an earlier run of the daemon before its first use, and
for one piece a child reports failing its CRC-32. A piece whose bytes changed on disk (a failing disk, a
stray write) is then fetched again instead of being handed out.

Rules: blocking (run it in a worker thread); one buffer of one piece, reused; the caller's fd is only
read (pread), never moved or closed; a piece cut short by a truncated file counts as corrupt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from dfly.common.digest import crc32
from dfly.common.pieces import piece_range


def corrupt_pieces(
    fd: int,
    content_length: int,
    piece_length: int,
    pieces: Iterable[tuple[int, int]],
    should_stop: Callable[[], bool] = lambda: False,
) -> list[int]:
    """The numbers of the `(number, digest)` pieces whose bytes in `fd` no longer have that digest
    (those read before `should_stop` said so, checked between pieces)."""
    if content_length <= 0:
        return []
    buffer = memoryview(bytearray(min(piece_length, content_length)))
    os.posix_fadvise(fd, 0, content_length, os.POSIX_FADV_SEQUENTIAL)
    bad: list[int] = []
    for number, digest in pieces:
        if should_stop():
            break
        offset, length = piece_range(number, piece_length, content_length)
        filled = 0
        while filled < length:
            got = os.preadv(fd, [buffer[filled:length]], offset + filled)
            if got == 0:
                break  # the file ends early
            filled += got
        if filled < length or crc32(buffer[:length]) != digest:
            bad.append(number)
    return bad
