"""What one download asks for, as the daemon passes it around (local API, seed trigger, conductor).

The task id is computed here and nowhere else in the daemon (`dfly.common.ids.task_id`), from the
same fields the scheduler's `Download` message carries.

Every request is checked when it is made, whoever made it (local API, proxy, seed trigger): its text
must be UTF-8 (protobuf and the task id need it; a proxy header can carry undecodable bytes), the URL
must hold no control characters or spaces, and header names must be HTTP tokens with values free of
line breaks and NUL, in ISO-8859-1 (what HTTP/1.1 can carry; the origin reader sends them so).
Non-ASCII characters in a URL are sent percent-encoded as UTF-8 (source/http_open.py). Anything else
is a UsageError, never a failure deep inside the download.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import UsageError
from dfly.common.ids import (
    DEFAULT_FILTERED_QUERY_PARAMS,
    TaskId,
    canonical_url,
    task_id,
)
from dfly.common.pieces import validate_layout, validate_user_piece_length
from dfly.daemon.core.task_state import Layout

SEED_TIMEOUT_S = 10 * 3600.0  # a seed trigger without a timeout (Dragonfly's: 10 h)
# A download's request headers go to the origin and travel in its seed trigger: every request (local
# API, proxy, trigger) is held to the same bounds, so a seed never refuses what a peer took.
MAX_REQUEST_HEADERS = 256
MAX_REQUEST_HEADER_BYTES = 256 * 1024  # names and values; both are checked to be one byte a character
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")


def _check_text(what: str, value: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 text: {value!r}") from None


def check_header_bounds(headers: Mapping[str, str]) -> None:
    """UsageError if a download's request headers exceed what a seed trigger may carry."""
    size = sum(len(k) + len(v) for k, v in headers.items())
    if len(headers) > MAX_REQUEST_HEADERS or size > MAX_REQUEST_HEADER_BYTES:
        raise UsageError(
            f"{len(headers)} request headers of {size} bytes: at most {MAX_REQUEST_HEADERS} and "
            f"{MAX_REQUEST_HEADER_BYTES} bytes"
        )


@dataclass(frozen=True)
class TaskRequest:
    url: str
    tag: str = ""
    application: str = ""
    filtered_query_params: tuple[str, ...] = DEFAULT_FILTERED_QUERY_PARAMS
    headers: dict[str, str] = field(default_factory=dict)
    piece_length: int | None = None
    timeout_s: float = 7200.0
    disable_back_to_source: bool = False
    need_back_to_source: bool = False
    # From the proxy: the origins (scheme://host[:port]) the origin reader may contact, redirect hops
    # included; empty = any. Travels in the seed trigger; not part of the task id.
    allowed_origins: tuple[str, ...] = ()
    # A seed trigger: this daemon reads the origin for another host's download (not part of the task id).
    for_swarm: bool = False

    def __post_init__(self) -> None:
        _check_text("url", self.url)
        if _URL_FORBIDDEN.search(self.url):
            raise UsageError(f"url holds a space or a control character: {self.url!r}")
        _check_text("tag", self.tag)
        _check_text("application", self.application)
        for name in self.filtered_query_params:
            _check_text("filtered query parameter", name)
        check_header_bounds(self.headers)
        for name, value in self.headers.items():
            if not _TOKEN.fullmatch(name):
                raise UsageError(f"invalid header name {name!r}")
            _check_text(f"header {name}", value)
            if _VALUE_FORBIDDEN.search(value):
                raise UsageError(f"header {name}: value holds a line break or NUL")
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise UsageError(f"header {name}: value is not ISO-8859-1 text, as HTTP needs") from None

    @property
    def task_id(self) -> TaskId:
        return task_id(
            self.url,
            tag=self.tag,
            application=self.application,
            piece_length=self.piece_length,
            filtered_query_params=self.filtered_query_params,
        )

    def to_proto(self) -> pb.Download:
        return pb.Download(
            url=self.url,
            tag=self.tag,
            application=self.application,
            filtered_query_params=list(self.filtered_query_params),
            request_headers=self.headers,
            piece_length=self.piece_length or 0,
            disable_back_to_source=self.disable_back_to_source,
            timeout_s=self.timeout_s,
            need_back_to_source=self.need_back_to_source,
            allowed_origins=list(self.allowed_origins),
        )

    @classmethod
    def seed_trigger(cls, download: pb.Download) -> TaskRequest:
        """The scheduler's DownloadTask: this daemon reads the origin for the swarm (UsageError: invalid)."""
        canonical_url(download.url)
        if download.piece_length:
            validate_user_piece_length(download.piece_length)
        timeout_s = download.timeout_s or SEED_TIMEOUT_S
        if not 0 < timeout_s < math.inf:  # NaN too
            raise UsageError(f"timeout_s {timeout_s} must be a positive, finite number of seconds")
        headers = dict(download.request_headers)  # bounded in __post_init__, as every request
        return cls(
            url=download.url,
            tag=download.tag,
            application=download.application,
            # the requester's effective list as is: an empty one is `--no-default-filters`, not the defaults
            filtered_query_params=tuple(download.filtered_query_params),
            headers=headers,
            piece_length=download.piece_length or None,
            timeout_s=timeout_s,
            need_back_to_source=True,
            allowed_origins=tuple(download.allowed_origins),
            for_swarm=True,
        )


def layout_from_proto(layout: pb.TaskLayout) -> Layout | None:
    """The scheduler's layout (None: not known yet); UsageError for one dfly could not have made."""
    if layout.piece_length == 0:  # the scheduler does not know it yet (content_length -1)
        return None
    validate_layout(layout.content_length, layout.piece_length)
    return Layout(layout.content_length, layout.piece_length)
