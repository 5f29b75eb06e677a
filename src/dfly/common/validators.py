"""Whether two answers of an origin name the same object, by their validators (RFC 9110 §8.8).

Rules: the entity tags decide when both answers have one (weak and strong compared alike), else
`Last-Modified` when both have it; with nothing to compare the object is taken as the same. Header names
are compared case-insensitively. Shared by the daemon's origin reader (a held partial copy) and the
scheduler (origin readers of one task). Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def _lower(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return {name.lower(): value for name, value in pairs}


def same_object(
    known: Mapping[str, str] | Iterable[tuple[str, str]], now: Mapping[str, str] | Iterable[tuple[str, str]]
) -> bool:
    """False when `known` and `now` carry validators that name different objects."""
    old, new = _lower(known), _lower(now)
    old_tag, new_tag = old.get("etag", ""), new.get("etag", "")
    if old_tag and new_tag:
        return old_tag.removeprefix("W/") == new_tag.removeprefix("W/")
    old_date, new_date = old.get("last-modified", ""), new.get("last-modified", "")
    if old_date and new_date:
        return old_date == new_date
    return True
