"""A process out of file descriptors says so, as its own condition: `is_out_of_descriptors` finds EMFILE
also inside aiohttp's connector errors; a reader's copy of a task fd fails as OutOfDescriptors (not a
crash); the proxy answers it 503 with Retry-After, not 502 blaming the origin."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from dfly.common.errors import OutOfDescriptors, is_out_of_descriptors, out_of_descriptors
from dfly.daemon.local_api_messages import Started
from dfly.daemon.proxy.forward import hop_guard
from dfly.daemon.proxy.http_edge import answer
from dfly.daemon.source.http_open import open_get


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """Every descriptor number under a lowered soft limit taken; all given back on the way out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_emfile_is_recognised_directly_and_inside_aiohttp_errors() -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    key = ConnectionKey("origin.test", 80, False, True, None, None, None)
    assert is_out_of_descriptors(emfile)
    assert is_out_of_descriptors(OSError(errno.ENFILE, "File table overflow"))
    assert is_out_of_descriptors(aiohttp.ClientConnectorError(key, emfile))
    assert not is_out_of_descriptors(
        aiohttp.ClientConnectorError(key, OSError(errno.ECONNREFUSED, "refused"))
    )
    assert not is_out_of_descriptors(TimeoutError())


def test_a_readers_copy_of_the_task_fd_fails_as_out_of_descriptors() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    started = Started("t" * 64, 0, 4096, "/dev/null", fd)
    try:
        with no_descriptor_left(), pytest.raises(OutOfDescriptors, match="out of file descriptors"):
            started.own_read_fd()
        own = started.own_read_fd()  # descriptors back: a copy again
        os.close(own)
    finally:
        os.close(fd)


def test_an_origin_read_out_of_descriptors_is_not_the_origins_failure() -> None:
    """As a SourceError it would fail the task for every peer of the swarm ("the origin was read by …")."""
    with no_descriptor_left(), pytest.raises(OutOfDescriptors, match="connecting to the origin"):
        open_get("http://127.0.0.1:9/f", {}, 5.0, hop_guard(()), None, False)


def test_the_proxy_answers_503_with_retry_after() -> None:
    async def failing() -> aiohttp.web.StreamResponse:
        raise out_of_descriptors("connecting upstream")

    response = asyncio.run(answer(failing()))
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Dragonfly-Error-Type"] == "out-of-descriptors"
