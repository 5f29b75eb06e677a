"""Piece-length rule, piece ranges, size parsing and digest parsing."""

import zlib

import pytest

from dfly.common.digest import FileHasher, crc32, parse_digest
from dfly.common.errors import UsageError
from dfly.common.pieces import (
    KiB,
    MiB,
    default_piece_length,
    parse_size,
    piece_count,
    piece_range,
    validate_layout,
    validate_user_piece_length,
)


@pytest.mark.parametrize(
    ("content_length", "expected"),
    [
        (0, 256 * KiB),
        (1, 256 * KiB),
        (16 * MiB, 256 * KiB),
        (64 * MiB, 256 * KiB),
        (128 * MiB - 1, 256 * KiB),
        (128 * MiB, 512 * KiB),
        (256 * MiB, 1 * MiB),
        (1024 * MiB - 1, 2 * MiB),
        (1024 * MiB, 4 * MiB),
        (4096 * MiB, 16 * MiB),
        (100 * 1024 * MiB, 16 * MiB),
    ],
)
def test_default_piece_length(content_length: int, expected: int) -> None:
    assert default_piece_length(content_length) == expected


def test_files_of_16mib_to_4gib_have_at_least_64_pieces_and_from_64mib_256() -> None:
    for size in (16 * MiB + 1, 40 * MiB, 64 * MiB, 100 * MiB, 1000 * MiB, 1024 * MiB, 4096 * MiB):
        assert piece_count(size, default_piece_length(size)) >= (256 if size >= 64 * MiB else 64)


def test_piece_ranges_cover_the_file_exactly() -> None:
    size, length = 10 * MiB + 123, 1 * MiB
    ranges = [piece_range(n, length, size) for n in range(piece_count(size, length))]
    assert ranges[0] == (0, MiB)
    assert ranges[-1] == (10 * MiB, 123)
    assert sum(r[1] for r in ranges) == size
    with pytest.raises(ValueError, match="out of range"):
        piece_range(11, length, size)


@pytest.mark.parametrize("length", [64 * KiB, 4 * MiB, 64 * MiB])
def test_user_piece_length_accepted(length: int) -> None:
    assert validate_user_piece_length(length) == length


@pytest.mark.parametrize("length", [32 * KiB, 3 * MiB, 128 * MiB, 0])
def test_user_piece_length_rejected(length: int) -> None:
    with pytest.raises(UsageError):
        validate_user_piece_length(length)


@pytest.mark.parametrize(
    ("text", "value"), [("4MiB", 4 * MiB), ("512k", 512 * KiB), ("1048576", MiB), ("1 gib", 1024 * MiB)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["4 parsecs", "\u0663MiB", "1" * 20, "1" * 5000])
def test_parse_size_rejects_garbage(text: str) -> None:
    """Also other scripts' digits and numbers of more than 19 digits (int() refuses 4,300: no traceback)."""
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert len(str(info.value)) < 120


def test_digests() -> None:
    data = b"hello dfly" * 1000
    assert crc32(data) == zlib.crc32(data)
    for algorithm in ("sha256", "sha512", "crc32"):
        hasher = FileHasher(algorithm)
        hasher.update(data[:100])
        hasher.update(data[100:])
        digest = hasher.digest()
        assert parse_digest(str(digest)) == digest
    assert str(parse_digest("SHA256:" + "AB" * 32)) == "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text", ["md5:abc", "sha256:xyz", "sha256:" + "a" * 63, "crc32:-1", "crc32:99999999999"]
)
def test_parse_digest_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_digest(text)


@pytest.mark.parametrize(
    ("content_length", "piece_length"),
    [(0, 64 * KiB), (1, 256 * KiB), (1 << 40, 64 * KiB), (1 << 44, 16 * MiB), (5, 64 * MiB)],
)
def test_layout_accepted(content_length: int, piece_length: int) -> None:
    validate_layout(content_length, piece_length)


@pytest.mark.parametrize(
    ("content_length", "piece_length"),
    [
        (1, 0),
        (1, -64 * KiB),
        (1, 1000),
        (1, 32 * KiB),
        (1, 128 * MiB),
        (-1, 64 * KiB),
        ((1 << 40) + 1, 64 * KiB),  # one piece more than MAX_PIECE_COUNT
    ],
)
def test_layout_refused(content_length: int, piece_length: int) -> None:
    with pytest.raises(UsageError, match="invalid layout"):
        validate_layout(content_length, piece_length)
