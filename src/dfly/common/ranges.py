"""HTTP `Range: bytes=` parsing shared by the test origin and the daemon's registry mirror (one range only).

Standard library only.
"""

from __future__ import annotations


class Unsatisfiable(Exception):
    """The range starts past the end (HTTP 416)."""


_BEYOND = 1 << 63  # a position of more than 19 digits: past any object (int() refuses 4,300 digits)


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= 19 else _BEYOND


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) of one `bytes=` range; None to serve the whole body; raises Unsatisfiable for a 416.
    Only ASCII digits count (`str.isdigit` also takes `²` and other scripts' digits)."""
    unit, _, spec = header.strip().partition("=")
    first_text, dash, last_text = (part.strip() for part in spec.partition("-"))
    digits = first_text + last_text
    if unit.strip().lower() != "bytes" or not dash or not (digits.isascii() and digits.isdigit()):
        return None  # not a single byte range (several ranges included): ignore it
    if not first_text:  # suffix: the last n bytes
        suffix = _position(last_text)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    first, last = _position(first_text), _position(last_text) if last_text else size - 1
    if last_text and last < first:
        return None
    if first >= size:
        raise Unsatisfiable
    return first, min(last, size - 1)
