"""A layout the scheduler sends is checked before a file or bitmap is sized from it."""

from __future__ import annotations

import pytest

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import UsageError
from dfly.daemon.core.task_state import Layout
from dfly.daemon.task_request import layout_from_proto


def test_unknown_layout_is_none() -> None:
    assert layout_from_proto(pb.TaskLayout(content_length=-1, piece_length=0)) is None


def test_valid_layout_is_kept() -> None:
    assert layout_from_proto(pb.TaskLayout(content_length=5, piece_length=1 << 16)) == Layout(5, 1 << 16)


@pytest.mark.parametrize(("content_length", "piece_length"), [(10, 1000), (-3, 1 << 16), (1 << 50, 1 << 16)])
def test_impossible_layout_is_a_clear_error(content_length: int, piece_length: int) -> None:
    with pytest.raises(UsageError, match="invalid layout"):
        layout_from_proto(pb.TaskLayout(content_length=content_length, piece_length=piece_length))
