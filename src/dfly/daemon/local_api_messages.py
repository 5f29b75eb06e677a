"""The local API's messages (docs/local-api.md): the download request a client sends, the events a
backend yields for it, and their JSON-line encodings.

Rules: a request line is one JSON object with op `download` or `stats`; unknown fields, wrong types and
bad values are a UsageError (never a traceback); absent fields take the documented defaults (the
default filtered query parameters, a 2-hour timeout). Events go out as compact JSON lines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dfly.common.errors import DflyError, StorageError, UsageError, is_out_of_descriptors, out_of_descriptors
from dfly.common.ids import DEFAULT_FILTERED_QUERY_PARAMS
from dfly.common.pieces import validate_user_piece_length
from dfly.daemon.task_request import check_header_bounds

DEFAULT_TIMEOUT_S = 2 * 3600.0


@dataclass(frozen=True)
class DownloadRequest:
    url: str
    tag: str
    application: str
    filtered_query_params: tuple[str, ...]
    headers: dict[str, str]
    piece_length: int | None
    timeout_s: float
    disable_back_to_source: bool
    allowed_origins: tuple[str, ...] = ()  # set by the proxy: see TaskRequest


@dataclass(frozen=True)
class Started:
    """The task's layout; `read_fd` stays owned by the daemon and is valid only until the receiver's next
    await: the receiver takes its own copy at once (`own_read_fd`)."""

    task_id: str
    content_length: int
    piece_length: int
    task_path: str
    read_fd: int
    response_headers: Mapping[str, str] = field(default_factory=dict)  # the origin's, as the task recorded

    def own_read_fd(self) -> int:
        """A dup of `read_fd` the caller closes; no descriptor left is OutOfDescriptors, not a crash."""
        try:
            return os.dup(self.read_fd)
        except OSError as exc:
            if is_out_of_descriptors(exc):
                raise out_of_descriptors("opening the task file for this reader") from None
            raise StorageError(
                f"cannot open the file of task {self.task_id[:12]}: {exc.strerror or exc}"
            ) from None


@dataclass(frozen=True)
class PiecesReady:
    pieces: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    pass


DownloadEvent = Started | PiecesReady | Finished


class LocalApiBackend(Protocol):
    def download(self, request: DownloadRequest) -> AsyncIterator[DownloadEvent]:
        """Events of one download: Started, PiecesReady batches, Finished; raises DflyError subclasses."""
        ...

    def stats(self) -> dict[str, object]: ...


_REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "op": (str,), "url": (str,), "tag": (str,), "application": (str,), "filtered_query_params": (list,),
    "headers": (dict,), "piece_length": (int, type(None)), "timeout_s": (int, float),
    "disable_back_to_source": (bool,),
}  # fmt: skip


def parse_request(line: bytes) -> DownloadRequest | None:
    """The download request of one line (None for `stats`); absent fields take the documented defaults.

    Raises UsageError for anything else: not JSON, unknown op or field, wrong types, bad values.
    """
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError("request is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict) or obj.get("op") not in ("download", "stats"):
        raise UsageError("request must be a JSON object with op 'download' or 'stats'")
    if obj["op"] == "stats":
        if len(obj) > 1:
            raise UsageError(f"unknown request fields: {sorted(set(obj) - {'op'})}")
        return None
    unknown = set(obj) - set(_REQUEST_FIELDS)
    if unknown:
        raise UsageError(f"unknown request fields: {sorted(unknown)}")
    for key, value in obj.items():
        types = _REQUEST_FIELDS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UsageError(f"request field {key!r} has the wrong type")
    if not obj.get("url"):
        raise UsageError("request field 'url' is required")
    filters = obj.get("filtered_query_params", list(DEFAULT_FILTERED_QUERY_PARAMS))
    headers = obj.get("headers", {})
    if not all(isinstance(name, str) for name in filters):
        raise UsageError("request field 'filtered_query_params' must hold strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise UsageError("request field 'headers' must map strings to strings")
    check_header_bounds(headers)
    if obj.get("piece_length") is not None:
        validate_user_piece_length(obj["piece_length"])
    try:
        timeout_s = float(obj.get("timeout_s", DEFAULT_TIMEOUT_S))
    except OverflowError:
        timeout_s = math.inf
    if not 0 < timeout_s < math.inf:
        raise UsageError("request field 'timeout_s' must be a positive, finite number of seconds")
    return DownloadRequest(
        url=obj["url"],
        tag=obj.get("tag", ""),
        application=obj.get("application", ""),
        filtered_query_params=tuple(filters),
        headers=dict(headers),
        piece_length=obj.get("piece_length"),
        timeout_s=timeout_s,
        disable_back_to_source=obj.get("disable_back_to_source", False),
    )


def encode_event(event: dict[str, object]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def error_event(exc: DflyError) -> dict[str, object]:
    status_code = int(getattr(exc, "status_code", 0) or 0)
    return {"event": "error", "kind": exc.kind, "message": exc.message, "status_code": status_code}
