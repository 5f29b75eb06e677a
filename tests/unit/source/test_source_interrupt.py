"""SourceInterrupt: another thread ends an origin read blocked in its connect or its read at once, and a
read interrupted before it connects never starts; the duplicate fd is closed once the read is over."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dfly.common.errors import SourceError
from dfly.daemon.source import http
from dfly.daemon.source.http_open import SourceInterrupt


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Takes connections (the kernel's backlog) and never answers: a read blocks until its timeout."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        yield listener.getsockname()[1]


@contextlib.contextmanager
def full_backlog_server() -> Iterator[int]:
    """A listener whose accept queue is full, so a new connect waits for a SYN-ACK that never comes."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            yield port
        finally:
            for filler in fillers:
                filler.close()


def stat_in_thread(url: str, interrupt: SourceInterrupt) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            http.stat(url, {}, timeout_s=30.0, interrupt=interrupt)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def blocked_within(interrupt: SourceInterrupt, seconds: float) -> None:
    """Wait until the read has a connection to watch (its connect started)."""
    deadline = time.monotonic() + seconds
    while not interrupt.watching:
        assert time.monotonic() < deadline, "the read never made a connection"
        time.sleep(0.01)


@pytest.mark.parametrize("server", [silent_server, full_backlog_server], ids=["read", "connect"])
def test_an_interrupt_ends_a_blocked_stat_at_once(
    server: Callable[[], contextlib.AbstractContextManager[int]],
) -> None:
    with server() as port:
        interrupt = SourceInterrupt()
        thread, errors = stat_in_thread(f"http://127.0.0.1:{port}/x", interrupt)
        blocked_within(interrupt, 5.0)
        thread.join(0.3)
        assert thread.is_alive(), "the stat should block on this server"
        started = time.monotonic()
        interrupt.interrupt()
        thread.join(5.0)
        assert not thread.is_alive(), "the interrupt did not end the blocked stat"
        assert time.monotonic() - started < 15.0  # against the 30 s timeout
        assert len(errors) == 1
        assert isinstance(errors[0], SourceError)
        assert not interrupt.watching  # released: its duplicate fd closed


def test_a_read_interrupted_before_it_connects_never_connects() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        interrupt = SourceInterrupt()
        interrupt.interrupt()
        with pytest.raises(SourceError, match="the read was stopped"):
            http.stat(
                f"http://127.0.0.1:{listener.getsockname()[1]}/x", {}, timeout_s=30.0, interrupt=interrupt
            )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was made


def test_a_shut_connection_ends_its_read_but_later_ones_may_be_made() -> None:
    """`shut` (a piece deadline passed) ends the read in progress only; `interrupt` refuses later ones."""
    with silent_server() as port:
        interrupt = SourceInterrupt()
        thread, errors = stat_in_thread(f"http://127.0.0.1:{port}/x", interrupt)
        blocked_within(interrupt, 5.0)
        interrupt.shut()
        thread.join(15.0)
        assert not thread.is_alive()
        assert isinstance(errors[0], SourceError)
        assert not interrupt.interrupted
        again, _ = stat_in_thread(f"http://127.0.0.1:{port}/x", interrupt)
        blocked_within(interrupt, 5.0)  # connected again
        interrupt.interrupt()
        again.join(15.0)
        assert not again.is_alive()


def test_the_duplicate_is_closed_when_the_read_ends() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with silent_server() as port:
        interrupt = SourceInterrupt()
        with pytest.raises(SourceError):
            http.stat(f"http://127.0.0.1:{port}/x", {}, timeout_s=0.2, interrupt=interrupt)
    assert not interrupt.watching
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_interrupt_ends_the_wait_for_a_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that waits out its own timeouts (5 s per try and name server with glibc): the read
    stops waiting for it at once; the lookup ends in its own daemon thread."""
    resolving, answer = threading.Event(), threading.Event()
    real = socket.getaddrinfo

    def slow_getaddrinfo(*args: object, **kwargs: object) -> object:
        resolving.set()
        answer.wait(30)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    try:
        interrupt = SourceInterrupt()
        thread, errors = stat_in_thread("http://origin.invalid:8080/x", interrupt)
        assert resolving.wait(5)
        started = time.monotonic()
        interrupt.interrupt()
        thread.join(15.0)
        assert not thread.is_alive(), "the interrupt did not end the wait for the lookup"
        assert time.monotonic() - started < 15.0  # against the 30 s the lookup takes here
        assert isinstance(errors[0], SourceError)
        assert "the read was stopped" in str(errors[0])
    finally:
        answer.set()
