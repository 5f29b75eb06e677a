"""dfget's side of the daemon's local API: connect, send one request line, read event lines and fds.

Rules: standard library only (dfget starts hundreds at a time); blocking socket with a timeout taken
from the overall deadline; every read uses recvmsg so a passed descriptor is never dropped; received
descriptors the caller does not take are closed. Wire format: docs/local-api.md.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any

from dfly.common.errors import ERROR_KINDS, DaemonUnreachable, DflyError, ProtocolError, SourceError

MAX_EVENT_BYTES = 16 * 1024 * 1024
_RECV_BYTES = 65536
_MAX_FDS = 4


class DeadlineExceeded(Exception):
    """The overall deadline passed while waiting for the daemon."""


class LocalApiClient:
    """One connection to the daemon; use as a context manager."""

    def __init__(self, endpoint: str, deadline: float) -> None:
        self.endpoint = endpoint
        self.deadline = deadline
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = bytearray()
        self._fds: list[int] = []
        self._eof = False
        try:
            self._sock.settimeout(self._remaining())
            self._sock.connect(endpoint)
        except TimeoutError:
            self._sock.close()
            raise DaemonUnreachable(f"cannot reach the daemon at {endpoint}: timed out") from None
        except OSError as exc:
            self._sock.close()
            reason = exc.strerror or str(exc)
            if os.path.exists(endpoint) and not stat.S_ISSOCK(os.stat(endpoint).st_mode):
                reason = "not a socket (-e names the daemon's local API socket, local_api.socket)"
            raise DaemonUnreachable(f"cannot reach the daemon at {endpoint}: {reason}") from None

    def __enter__(self) -> LocalApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._sock.close()

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded
        return remaining

    def send(self, request: dict[str, Any]) -> None:
        data = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        try:
            self._sock.settimeout(self._remaining())
            self._sock.sendall(data)
        except TimeoutError:
            raise DeadlineExceeded from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.endpoint}: {exc.strerror or exc}") from None

    def take_fd(self) -> int | None:
        """The oldest descriptor received and not yet taken; the caller then owns (closes) it."""
        return self._fds.pop(0) if self._fds else None

    def events(self) -> Iterator[dict[str, Any]]:
        """Event objects in order; ends at EOF. Descriptors are available via take_fd."""
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                yield _decode(line)
                continue
            if self._eof:
                if self._buf.strip():
                    raise ProtocolError("the daemon sent a truncated event line")
                return
            if len(self._buf) > MAX_EVENT_BYTES:
                raise ProtocolError("the daemon sent an event line that is too long")
            self._recv()

    def _recv(self) -> None:
        try:
            self._sock.settimeout(self._remaining())
            data, fds, flags, _ = socket.recv_fds(self._sock, _RECV_BYTES, _MAX_FDS)
        except TimeoutError:
            raise DeadlineExceeded from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.endpoint}: {exc.strerror or exc}") from None
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("the daemon passed more descriptors than expected")
        if not data:
            self._eof = True
        self._buf += data


def _decode(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise ProtocolError("the daemon sent an event that is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise ProtocolError("the daemon sent an event without an 'event' name")
    return event


def error_from_event(event: dict[str, Any]) -> DflyError:
    """The DflyError an `error` event stands for (unknown kinds become a plain DflyError)."""
    kind = str(event.get("kind", "dfly"))
    message = str(event.get("message") or "the daemon reported an error")
    status = event.get("status_code")
    status_code = status if isinstance(status, int) else 0
    if kind == SourceError.kind:
        if status_code and str(status_code) not in message:
            message = f"{message} (status {status_code})"
        return SourceError(message, status_code)
    return ERROR_KINDS.get(kind, DflyError)(message)
