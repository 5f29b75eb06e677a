"""The no-such-host hint after a failed announce: names looked up together and never for longer than
the bound, so a hanging resolver delays neither the daemon's start-up retries nor its stop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from dfly.daemon.app import _unresolvable


def test_names_that_do_not_resolve_are_named() -> None:
    found = asyncio.run(_unresolvable(["127.0.0.1:8002", "no-such-host.invalid:8002", "[::1]:8002"]))
    assert found == ["no-such-host.invalid"]


def test_a_hanging_resolver_gives_no_hint_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = threading.Event()
    real = socket.getaddrinfo

    def hanging(*args: object, **kwargs: object) -> object:
        answer.wait(30)  # a resolver waiting out its own timeouts
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", hanging)

    async def main() -> tuple[list[str], float]:
        started = time.monotonic()
        try:
            found = await _unresolvable(["a.example:8002", "b.example:8002", "c.example:8002"], timeout_s=0.3)
        finally:
            answer.set()  # the executor threads end, so asyncio.run's exit does not wait for them
        return found, time.monotonic() - started

    found, took = asyncio.run(main())
    assert found == []
    assert took < 5.0  # one bound for all names, not a resolver timeout per name
