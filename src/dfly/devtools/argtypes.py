"""argparse types for the benchmarks' numeric flags: a bad value is argparse's one-line usage error
(exit 2) before anything is built, never a run with NaN, a negative size or zero rounds."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type[float] | type[int], low: float, inclusive: bool) -> Callable[[str], float]:
    bound = f">= {low:g}" if inclusive else f"> {low:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


positive_int = _number(int, 0, inclusive=False)
non_negative_int = _number(int, 0, inclusive=True)
positive_float = _number(float, 0, inclusive=False)
non_negative_float = _number(float, 0, inclusive=True)
