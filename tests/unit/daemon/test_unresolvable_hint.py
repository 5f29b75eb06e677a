"""The no-such-host hint after a failed announce: names looked up together, in daemon threads, never
for longer than the bound, so a hanging resolver delays neither the daemon's start-up retries nor its
stop. The resolver is a stand-in (socket.getaddrinfo): no real DNS."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dfly.daemon.app import _unresolvable


def test_names_that_do_not_resolve_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolver(host: str, *_: object, **__: object) -> list[object]:
        if host == "gone.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return []

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    found = asyncio.run(_unresolvable(["10.0.0.1:8002", "gone.example:8002", "[::1]:8002"]))
    assert found == ["gone.example"]


def test_a_hanging_resolver_gives_no_hint_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = threading.Event()
    asked: list[str] = []

    def hanging(host: str, *_: object, **__: object) -> list[object]:
        asked.append(host)
        answer.wait(30)  # a resolver waiting out its own timeouts
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)

    async def main() -> tuple[list[str], float, int]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(3))  # as many as the names
        started = time.monotonic()
        found = await _unresolvable(["a.example:8002", "b.example:8002", "c.example:8002"], timeout_s=0.3)
        took = time.monotonic() - started
        # the executor is free although the lookups still hang: they run in threads of their own
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
        return found, took, len(asked)

    try:
        found, took, count = asyncio.run(main())
    finally:
        answer.set()
    assert found == []
    assert count == 3  # looked up together
    assert took < 5.0  # one bound for all names, not a resolver timeout per name
