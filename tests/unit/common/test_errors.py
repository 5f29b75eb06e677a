"""Finding what failed inside TaskGroups' exception groups (dfly.common.errors)."""

from __future__ import annotations

from dfly.common.errors import SourceError, first_dfly_error, first_leaf


def test_first_leaf_unwraps_nested_groups() -> None:
    inner = ValueError("Invalid IPv6 URL")
    group = BaseExceptionGroup("outer", [ExceptionGroup("unhandled errors in a TaskGroup", [inner])])
    assert first_leaf(group) is inner
    assert first_leaf(inner) is inner


def test_first_dfly_error_finds_one_beside_others() -> None:
    wanted = SourceError("origin returned 404")
    group = ExceptionGroup("tg", [ValueError("x"), ExceptionGroup("inner", [wanted])])
    assert first_dfly_error(group) is wanted
    assert first_dfly_error(ExceptionGroup("tg", [ValueError("x")])) is None
