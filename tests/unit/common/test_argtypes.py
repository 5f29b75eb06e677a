"""The benchmarks' numeric flag types (dfly.devtools.argtypes): finite, in range, else argparse's exit 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from dfly.devtools.argtypes import non_negative_float, positive_float, positive_int


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [(positive_int, "3", 3), (positive_float, "0.5", 0.5), (non_negative_float, "0", 0.0)],
)
def test_good_values(kind: Callable[[str], float], text: str, value: float) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=kind)
    assert parser.parse_args(["--x", text]).x == value


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (positive_int, "0"),
        (positive_int, "-4"),
        (positive_int, "2.5"),
        (positive_float, "0"),
        (positive_float, "nan"),
        (positive_float, "inf"),
        (non_negative_float, "-5"),
        (non_negative_float, "nan"),
        (non_negative_float, "x"),
    ],
)
def test_bad_values_are_a_usage_error(
    kind: Callable[[str], float], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--x", type=kind)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--x", text])
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("bench: error: argument --x: ")
