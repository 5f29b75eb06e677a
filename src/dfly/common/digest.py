"""Digests: CRC-32 piece digests and whole-file digests (`sha256:`, `sha512:`, `crc32:`).

A piece digest is the IEEE CRC-32 (zlib's polynomial; computed with zlib-ng when installed) of the piece
bytes as an unsigned int. Whole-file digests are
written `algorithm:value`: sha256 / sha512 in lower-case hex, crc32 as a decimal u32 (Dragonfly's form).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from dfly.common.errors import UsageError

try:  # zlib-ng's CRC-32 is the same function, ~14x faster than the system zlib here (docs/benchmarks.md)
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - dfget on a host without the daemon's dependencies
    from zlib import crc32 as _crc32

ALGORITHMS = ("sha256", "sha512", "crc32")


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return _crc32(data, value) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    value: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.value}"


def parse_digest(text: str) -> Digest:
    algorithm, sep, value = text.strip().partition(":")
    algorithm = algorithm.lower()
    if not sep or algorithm not in ALGORITHMS:
        raise UsageError(f"invalid digest {text!r}: expected sha256:<hex>, sha512:<hex> or crc32:<decimal>")
    if algorithm == "crc32":
        if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > 0xFFFFFFFF:  # isdigit() takes "²"
            raise UsageError(f"invalid crc32 digest {value!r}: expected a decimal u32")
        return Digest(algorithm, str(int(value)))
    want = 64 if algorithm == "sha256" else 128
    value = value.lower()
    if len(value) != want or any(c not in "0123456789abcdef" for c in value):
        raise UsageError(f"invalid {algorithm} digest: expected {want} hex characters")
    return Digest(algorithm, value)


class FileHasher:
    """Incremental whole-file digest in the algorithm of an expected Digest."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._hash = hashlib.new(algorithm) if algorithm != "crc32" else None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._hash is None:
            self._crc = _crc32(data, self._crc)
        else:
            self._hash.update(data)

    def digest(self) -> Digest:
        if self._hash is None:
            return Digest("crc32", str(self._crc & 0xFFFFFFFF))
        return Digest(self.algorithm, self._hash.hexdigest())


def file_digest(
    path: str | os.PathLike[str], algorithm: str = "sha256", chunk_bytes: int = 4 << 20
) -> Digest:
    """The whole-file digest of the file at `path` (raises OSError when it cannot be read)."""
    hasher = FileHasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.digest()
