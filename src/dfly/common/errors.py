"""The one error tree of dfly, translated at each edge into an exit code, gRPC or HTTP status.

    DflyError                 (exit 1)
    ├── UsageError            bad flags or arguments (exit 2)
    ├── ConfigError           bad config file or env override; a listener that cannot bind (exit 2)
    ├── SourceError           the origin refused or could not be read (carries status_code)
    ├── DigestMismatch        bytes do not match an expected digest
    ├── NoParents             no parent could serve and back-to-source is disabled
    ├── ProtocolError         a peer broke the piece protocol
    ├── DaemonUnreachable     dfget could not reach the daemon's socket
    ├── StorageError          the local cache could not be read or written
    │   └── StaleCopy         this host's partial copy is of an object the origin no longer has
    ├── DownloadTimeout       the download did not finish within its timeout
    └── OutOfDescriptors      this process has no file descriptor left (EMFILE/ENFILE): not the peer's
                              or the origin's fault, and gone once load drops

Messages are one line and name the thing that failed; no traceback reaches a user.
"""

from __future__ import annotations

import errno


class DflyError(Exception):
    """Base of every error dfly raises on purpose."""

    exit_code = 1
    kind = "dfly"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DflyError):
    exit_code = 2
    kind = "usage"


class ConfigError(DflyError):
    exit_code = 2
    kind = "config"


class SourceError(DflyError):
    kind = "source"

    def __init__(self, message: str, status_code: int = 0, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.headers = dict(headers or {})


class SourceRefused(SourceError):
    """This daemon may not contact that origin host or address (its guard, not the origin, said no)."""


class DigestMismatch(DflyError):
    kind = "digest"


class NoParents(DflyError):
    kind = "no-parents"


class ProtocolError(DflyError):
    kind = "protocol"


class DaemonUnreachable(DflyError):
    kind = "daemon-unreachable"


class StorageError(DflyError):
    kind = "storage"


class StaleCopy(StorageError):
    """The layout of this host's partial copy is not the object's now (its length changed): the copy is
    dropped when the attempt ends, and the next download starts afresh."""


class DownloadTimeout(DflyError):
    kind = "timeout"


class OutOfDescriptors(DflyError):
    kind = "out-of-descriptors"


def out_of_descriptors(doing: str) -> OutOfDescriptors:
    """The error for EMFILE/ENFILE met while `doing` something (a gerund phrase)."""
    return OutOfDescriptors(f"the daemon is out of file descriptors ({doing}); try again when its load drops")


def is_out_of_descriptors(exc: BaseException) -> bool:
    """Whether `exc` (or the OS error it wraps, as aiohttp's connector errors do) is EMFILE or ENFILE."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno in (errno.EMFILE, errno.ENFILE):
            return True
        wrapped = getattr(current, "os_error", None)
        if isinstance(wrapped, OSError) and wrapped.errno in (errno.EMFILE, errno.ENFILE):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


ERROR_KINDS: dict[str, type[DflyError]] = {
    cls.kind: cls
    for cls in (
        DflyError,
        UsageError,
        ConfigError,
        SourceError,
        DigestMismatch,
        NoParents,
        ProtocolError,
        DaemonUnreachable,
        StorageError,
        DownloadTimeout,
        OutOfDescriptors,
    )
}


def first_dfly_error(exc: BaseException) -> DflyError | None:
    """The DflyError inside `exc` (TaskGroups wrap their children's errors in groups)."""
    if isinstance(exc, DflyError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_dfly_error(inner)
            if found is not None:
                return found
    return None


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception that is not a group: what an unexpected failure inside TaskGroups was."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def without_frames(error: DflyError) -> DflyError:
    """The error with no tracebacks along its cause and context chain, for an error that outlives the
    code that raised it (a task's outcome): a traceback would keep every frame of that code alive."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        pending.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return error
