"""dfget: download a URL through the local dfdaemon into a file owned by the user.

Job: parse and validate flags (exit 2 on usage errors), ask the daemon over its unix socket
(docs/local-api.md), copy pieces from the passed task fd into a temporary file as they become available,
verify the digest, and place the file atomically (see `_dfget_output`). Exit 0 on success, 1 on failure
with one line on stderr, 2 on usage errors, 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP.

Rules: standard library only at start (hundreds start at once on busy hosts): `dfly.common.*` stdlib-only
modules are fine; rich is imported only for a progress bar on a terminal; never pydantic, grpc or yaml.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

from dfly.cli._dfget_client import DeadlineExceeded, LocalApiClient, error_from_event
from dfly.cli._dfget_output import OutputFile
from dfly.cli._dfget_progress import Progress, make_progress
from dfly.common.cli_args import OneLineParser
from dfly.common.errors import DflyError, DownloadTimeout, ProtocolError, UsageError
from dfly.common.ids import canonical_url, effective_filters, printable
from dfly.common.pieces import parse_size, piece_count, piece_range, validate_user_piece_length
from dfly.common.request_headers import set_by_daemon

if TYPE_CHECKING:
    from dfly.common.digest import Digest

DEFAULT_ENDPOINT = "/run/dfly/dfdaemon.sock"
DEFAULT_TIMEOUT = "2h"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
MAX_DURATION_S = 365 * 86400.0
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'30s', '10m', '2h', '1h30m', '500ms' or plain seconds ('90') -> seconds; must be positive."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif _DURATION.fullmatch(value):
        seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    else:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 10m, 2h, 1h30m)")
    if seconds <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    if seconds > MAX_DURATION_S:  # also keeps socket timeouts within what the platform takes
        raise UsageError(f"duration {text!r} is longer than a year")
    return seconds


def _duration_text(text: str) -> str:
    """The duration as the user wrote it, for messages; plain seconds get their unit ('90' -> '90s')."""
    value = text.strip().lower()
    return f"{value}s" if re.fullmatch(r"\d+(?:\.\d+)?", value) else value


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """'Name: value' strings -> dict; repeated names (any case) are joined with ', ' in order."""
    headers: dict[str, str] = {}
    names: dict[str, str] = {}  # lower-case name -> the spelling first seen
    for text in values:
        name, sep, value = text.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            raise UsageError(f"invalid header {text!r} (expected 'Name: value')")
        if set_by_daemon(name):
            raise UsageError(
                f"header {name!r} cannot be set: dfget fetches the whole object from the URL's host, and the "
                "daemon sets ranges, conditional, encoding and connection headers itself"
            )
        value = value.strip()
        key = names.setdefault(name.lower(), name)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


class Options(NamedTuple):
    url: str
    output: str
    digest: Digest | None
    tag: str
    application: str
    filtered_query_params: tuple[str, ...]
    headers: dict[str, str]
    piece_length: int | None
    timeout_s: float
    timeout_text: str
    disable_back_to_source: bool
    overwrite: bool
    force_hard_link: bool
    progress: bool
    endpoint: str


class _VersionAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("dfly")
        except PackageNotFoundError:
            text = "unknown"
        print(f"dfget {text}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="dfget",
        description="Download a URL through the local dfly daemon (peer-to-peer), into a file you own.",
    )
    p.add_argument("url", help="http:// or https:// URL to download")
    p.add_argument("-O", "--output", required=True, help="output file path")
    p.add_argument("--digest", help="expected whole-file digest: sha256:<hex>, sha512:<hex> or crc32:<u32>")
    p.add_argument("--tag", default="", help="task tag: different tags are different tasks")
    p.add_argument("--application", default="", help="caller's application name (part of the task id)")
    p.add_argument(
        "--filtered-query-param",
        action="append",
        default=[],
        metavar="NAME",
        help="query parameter ignored for the task id (repeatable; extends the defaults)",
    )
    p.add_argument(
        "--no-default-filters",
        action="store_true",
        help="do not filter the default presigned-URL parameters (only --filtered-query-param ones)",
    )
    p.add_argument(
        "-H", "--header", action="append", default=[], metavar="'K: V'", help="request header (repeatable)"
    )
    p.add_argument(
        "--piece-length", metavar="SIZE", help="fixed piece length, power of two in [64KiB, 64MiB]"
    )
    p.add_argument(
        "--timeout", default=DEFAULT_TIMEOUT, metavar="DURATION", help="overall deadline (default 2h)"
    )
    p.add_argument("--disable-back-to-source", action="store_true", help="fail rather than read the origin")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--force-hard-link",
        action="store_true",
        help="hard-link the cache's task file instead of copying (shares the cache's inode)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "-e",
        "--endpoint",
        default=os.environ.get("DFGET_ENDPOINT") or DEFAULT_ENDPOINT,
        metavar="SOCKET",
        help=f"daemon socket (default $DFGET_ENDPOINT, else {DEFAULT_ENDPOINT})",
    )
    p.add_argument("-V", "--version", action=_VersionAction, nargs=0, help="print the version and exit")
    return p


def check_output(path: str, *, overwrite: bool) -> str:
    """The absolute output path, checked before anything is downloaded; paths in the messages are
    escaped (a newline in a name would split the one-line error)."""
    if not path:
        raise UsageError("output path is empty (-O)")
    output = os.path.abspath(path)
    if os.path.isdir(output):
        raise UsageError(f"output {printable(path)} is a directory")
    if path.endswith(os.sep):
        raise UsageError(f"output {printable(path)} ends with {os.sep}: it must name a file")
    directory = os.path.dirname(output)
    if not os.path.isdir(directory):
        reason = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise UsageError(f"output directory {printable(directory)} {reason}")
    name_max = os.pathconf(directory, "PC_NAME_MAX")
    if len(os.fsencode(os.path.basename(output))) > name_max:
        raise UsageError(
            f"output file name is longer than {name_max} bytes, the most {printable(directory)} takes"
        )
    if os.path.lexists(output) and not overwrite:
        raise UsageError(f"output {printable(output)} already exists (use --overwrite to replace it)")
    if os.path.lexists(output) and not stat.S_ISREG(os.lstat(output).st_mode) and not os.path.islink(output):
        # --overwrite renames a new file over it: a device node (/dev/null) or FIFO would be replaced
        raise UsageError(f"output {printable(output)} is not a regular file; dfget writes regular files only")
    return output


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line; UsageError for invalid values (argparse exits 2 on its own)."""
    ns = build_parser().parse_args(argv)
    filters = effective_filters(ns.filtered_query_param, no_default_filters=ns.no_default_filters)
    canonical_url(ns.url, filters)
    digest = None
    if ns.digest is not None:
        from dfly.common.digest import parse_digest  # its dataclass pulls in inspect: only when needed

        digest = parse_digest(ns.digest)
    piece_length = None
    if ns.piece_length is not None:
        piece_length = validate_user_piece_length(parse_size(ns.piece_length))
    if ns.overwrite and ns.force_hard_link:
        raise UsageError("--overwrite cannot be combined with --force-hard-link")
    if not ns.endpoint:
        raise UsageError("daemon socket is empty (-e / DFGET_ENDPOINT)")
    output = check_output(ns.output, overwrite=ns.overwrite)
    return Options(
        url=ns.url,
        output=output,
        digest=digest,
        tag=ns.tag,
        application=ns.application,
        filtered_query_params=filters,
        headers=parse_headers(ns.header),
        piece_length=piece_length,
        timeout_s=parse_duration(ns.timeout),
        timeout_text=_duration_text(ns.timeout),
        disable_back_to_source=ns.disable_back_to_source,
        overwrite=ns.overwrite,
        force_hard_link=ns.force_hard_link,
        progress=not ns.no_progress,
        endpoint=ns.endpoint,
    )


def _request(opts: Options, deadline: float) -> dict[str, object]:
    return {
        "op": "download",
        "url": opts.url,
        "tag": opts.tag,
        "application": opts.application,
        "filtered_query_params": list(opts.filtered_query_params),
        "headers": opts.headers,
        "piece_length": opts.piece_length,
        "timeout_s": max(deadline - time.monotonic(), 0.001),
        "disable_back_to_source": opts.disable_back_to_source,
    }


class _Download:
    """The state of one download while events arrive."""

    def __init__(self, opts: Options, out: OutputFile, progress: Progress) -> None:
        self.opts = opts
        self.out = out
        self.progress = progress
        self.task_fd: int | None = None
        self.content_length = 0
        self.piece_length = 0
        self.have: bytearray | None = None
        self.missing = 0

    def started(self, event: dict[str, Any], fd: int | None) -> None:
        if self.have is not None:
            raise ProtocolError("the daemon sent 'started' twice")
        self.task_fd = fd
        content_length, piece_length = event.get("content_length"), event.get("piece_length")
        task_path = event.get("task_path")
        if not isinstance(content_length, int) or content_length < 0:
            raise ProtocolError("the daemon sent a bad content_length")
        if not isinstance(piece_length, int) or piece_length <= 0 or not isinstance(task_path, str):
            raise ProtocolError("the daemon sent a bad piece_length or task_path")
        if fd is None:
            raise ProtocolError("the daemon did not pass the task file descriptor")
        self.content_length, self.piece_length = content_length, piece_length
        self.missing = piece_count(content_length, piece_length)
        self.have = bytearray(self.missing)
        if self.opts.force_hard_link:
            self.out.link_task_file(fd, task_path)
        else:
            self.out.allocate(content_length)
        self.progress.start(content_length, os.path.basename(self.opts.output))

    def pieces(self, event: dict[str, Any]) -> None:
        numbers = event.get("pieces")
        if self.have is None or self.task_fd is None:
            raise ProtocolError("the daemon sent pieces before 'started'")
        if not isinstance(numbers, list):
            raise ProtocolError("the daemon sent a bad pieces event")
        for n in numbers:
            if not isinstance(n, int) or not 0 <= n < len(self.have):
                raise ProtocolError(f"the daemon sent piece {n!r} outside the task")
            offset, length = piece_range(n, self.piece_length, self.content_length)
            if not self.out.linked:
                self.out.copy(self.task_fd, offset, length)  # again when announced again: re-fetched
            if self.have[n]:
                continue
            self.have[n] = 1
            self.missing -= 1
            self.progress.advance(length)

    def finished(self) -> None:
        if self.have is None:
            raise ProtocolError("the daemon sent 'finished' before 'started'")
        if self.missing:
            raise ProtocolError(f"the daemon finished with {self.missing} pieces not delivered")


def download(opts: Options) -> None:
    """Run one download to its placed output; raises DflyError (the temporary file is always removed)."""
    deadline = time.monotonic() + opts.timeout_s
    out = OutputFile(opts.output, nameless=not opts.force_hard_link)
    progress: Progress = make_progress(opts.progress)
    state = _Download(opts, out, progress)
    try:
        with LocalApiClient(opts.endpoint, deadline) as client:
            client.send(_request(opts, deadline))
            for event in client.events():
                name = event["event"]
                if name == "started":
                    state.started(event, client.take_fd())
                elif name == "pieces":
                    state.pieces(event)
                elif name == "finished":
                    state.finished()
                    break
                elif name == "error":
                    error = error_from_event(event)
                    if isinstance(error, DownloadTimeout):  # the daemon's deadline (what was left of ours)
                        raise DeadlineExceeded
                    raise error
                else:
                    raise ProtocolError(f"the daemon sent an unknown event {name!r}")
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded
            else:
                raise ProtocolError("the daemon closed the connection before the download finished")
        progress.stop()
        if opts.digest is not None:
            out.verify(opts.digest)
        out.place(overwrite=opts.overwrite)
    except DeadlineExceeded:
        raise DownloadTimeout(f"download timed out after {opts.timeout_text}") from None
    finally:
        progress.stop()
        if state.task_fd is not None:
            os.close(state.task_fd)
        out.discard()


class _Terminated(BaseException):
    """SIGTERM or SIGHUP (the terminal or SSH session went away) arrived: unwind so the temporary file
    is removed; the exit status is 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _fail(message: str) -> None:
    print(f"dfget: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version (0) and its own usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    except UsageError as exc:
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    try:
        download(opts)
    except DflyError as exc:
        _fail(str(exc))
        return exc.exit_code
    except OSError as exc:  # not expected: every known failure is a DflyError; still one line
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except _Terminated as exc:
        _fail("terminated" if exc.signum == signal.SIGTERM else "hung up")
        return 128 + exc.signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
