"""What a P2P response says about the object it serves, and the client's preconditions checked against it.

Rules (RFC 9110 §8.8, §13):
- The origin's `Content-Type`, `ETag`, `Last-Modified` and `Cache-Control`, as the task recorded them when
  the origin was first read, go out with the bytes; `Content-Type: application/octet-stream` when the
  origin sent none. A value that is not printable ASCII or is longer than MAX_VALUE is dropped: the
  recorded headers reach this daemon through the scheduler and peers.
- `If-None-Match` that matches the ETag (weak comparison; `*` matches any) answers 304 with the
  validators and no body; without `If-None-Match`, so does `If-Modified-Since` at or after Last-Modified.
- `If-Range` keeps the `Range` only when it is the ETag (strong comparison: neither side weak) or the
  Last-Modified date itself; anything else, an unknown validator included, means the whole object (200),
  so a client resuming a copy of an older object never gets a tail of the new one spliced onto it.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from datetime import datetime

MAX_VALUE = 1024
PASSED = ("Content-Type", "ETag", "Last-Modified", "Cache-Control")
VALIDATORS = ("ETag", "Last-Modified", "Cache-Control")  # what a 304 repeats
DEFAULT_CONTENT_TYPE = "application/octet-stream"
ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


def _safe(value: str) -> bool:
    return len(value) <= MAX_VALUE and value.isascii() and value.isprintable()


def origin_headers(recorded: Mapping[str, str]) -> dict[str, str]:
    """The representation headers of the object, from the headers its task recorded."""
    by_name = {name.lower(): value for name, value in recorded.items()}
    out = {name: value for name in PASSED if _safe(value := by_name.get(name.lower(), "").strip()) and value}
    out.setdefault("Content-Type", DEFAULT_CONTENT_TYPE)
    return out


def _entity_tags(field: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque tag) of each entity-tag in a list; None when the field is not such a list."""
    tags, position = [], 0
    while position < len(field):
        match = ENTITY_TAG.match(field, position)
        if match is None:
            return None
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return tags


def _date(value: str) -> datetime | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None


def not_modified(request: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """True when the client's copy is current: answer 304 (`headers` from `origin_headers`)."""
    if "If-None-Match" in request:
        field = request["If-None-Match"].strip()
        if field == "*":
            return True
        tags, ours = _entity_tags(field), _entity_tags(headers.get("ETag", ""))
        if not tags or not ours or len(ours) != 1:
            return False
        return any(tag == ours[0][1] for _, tag in tags)  # weak comparison: W/ ignored on both sides
    if "If-Modified-Since" in request and "Last-Modified" in headers:
        since, modified = _date(request["If-Modified-Since"]), _date(headers["Last-Modified"])
        return since is not None and modified is not None and modified <= since
    return False


def range_applies(request: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """Whether the client's `Range` is to be honoured: no `If-Range`, or one naming this very object."""
    if "If-Range" not in request:
        return True
    field = request["If-Range"].strip()
    if field.startswith(('"', "W/")):
        tags, ours = _entity_tags(field), _entity_tags(headers.get("ETag", ""))
        return tags is not None and len(tags) == 1 and tags == ours and not tags[0][0]  # strong comparison
    modified = headers.get("Last-Modified", "")
    return bool(modified) and _date(field) is not None and field == modified
