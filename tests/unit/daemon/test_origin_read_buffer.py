"""The origin read's buffer: piece-sized slots within a share of the daemon's buffer budget, never more
than is left to read; `read_pieces` takes a buffer of just the object when it is one short piece."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from dfly.common.pieces import KiB, MiB
from dfly.daemon.back_to_source import read_buffer_bytes
from dfly.daemon.core.task_state import Layout
from dfly.daemon.source.http import read_pieces, stat
from dfly.devtools.origin import Origin, make_file

BUDGET = 32 * MiB  # download.buffer_bytes' default


@pytest.mark.parametrize(
    ("content", "piece", "first", "expected"),
    [
        (64 * MiB, 256 * KiB, 0, 4 * MiB),  # a share of the budget (1/8)
        (1024 * MiB, 4 * MiB, 0, 8 * MiB),  # two slots: half the budget at most
        (4096 * MiB, 16 * MiB, 0, 16 * MiB),  # one slot (it took the whole 32 MiB)
        (MiB, 64 * MiB, 0, MiB),  # a 1 MiB object in a 64 MiB piece: 1 MiB (it asked for 128 MiB)
        (10 * MiB, 4 * MiB, 2, 2 * MiB),  # only the last, short piece is left
    ],
)
def test_read_buffer_bytes(content: int, piece: int, first: int, expected: int) -> None:
    assert read_buffer_bytes(BUDGET, Layout(content, piece), first_piece=first) == expected


def test_a_one_piece_object_reads_through_a_buffer_of_its_own_size(tmp_path: Path) -> None:
    with Origin(tmp_path) as origin:
        make_file(tmp_path / "small.bin", 100 * KiB, seed=3)
        st = stat(origin.url("small.bin"), {}, timeout_s=5)
        got: list[tuple[int, int]] = []
        read_pieces(st, {}, piece_length=64 * MiB, buffer=bytearray(100 * KiB),
                    on_piece=lambda n, view, crc: got.append((n, crc)), should_stop=lambda: False,
                    timeout_s=5)  # fmt: skip
        assert got == [(0, zlib.crc32((tmp_path / "small.bin").read_bytes()))]
        with pytest.raises(ValueError, match="cannot hold a piece"):
            read_pieces(st, {}, piece_length=64 * KiB, buffer=bytearray(10 * KiB), on_piece=lambda *a: None,
                        should_stop=lambda: False, timeout_s=5)  # fmt: skip
