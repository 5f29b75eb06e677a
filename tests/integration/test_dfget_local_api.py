"""dfget against a real LocalApiServer (unix socket, fd passing) with a fake download backend.

The backend is faked at the unit's edge: it serves a real task file on disk piece by piece (writing each
piece just before announcing it), or fails (SourceError 404, a failure after start) or stalls. dfget runs
as a real subprocess; the server runs on its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from clusterkit import wait_until

from dfly.common.errors import ConfigError, DownloadTimeout, SourceError
from dfly.common.ids import DEFAULT_FILTERED_QUERY_PARAMS
from dfly.daemon.local_api import LocalApiServer
from dfly.daemon.local_api_messages import DownloadEvent, DownloadRequest, Finished, PiecesReady, Started

pytestmark = pytest.mark.integration

PIECE = 256 * 1024
SIZE = 5 * PIECE + 1234  # six pieces, the last one short
ORIGIN = "http://origin.test"
MANY = 150_000  # pieces: more than one `pieces` event lists


class FakeBackend:
    """Serves `{ORIGIN}/file/<id>`, `/empty/<id>`, `/404/<id>`, `/fail-mid/<id>`, `/stall/<id>` and
    `/daemon-timeout/<id>` (the daemon's own deadline passed)."""

    def __init__(self, task_dir: Path) -> None:
        self.task_dir = task_dir
        self.data = random.Random(7).randbytes(SIZE)
        self.requests: list[DownloadRequest] = []
        self.closed: dict[str, threading.Event] = {}
        self.task_paths: dict[str, Path] = {}

    def stats(self) -> dict[str, object]:
        return {"requests": len(self.requests)}

    def download(self, request: DownloadRequest) -> AsyncIterator[DownloadEvent]:
        self.requests.append(request)
        self.closed.setdefault(request.url, threading.Event())
        return self._serve(request)

    async def _serve(self, request: DownloadRequest) -> AsyncIterator[DownloadEvent]:
        kind, _, name = urlsplit(request.url).path.strip("/").partition("/")
        try:
            if kind == "404":
                raise SourceError(f"origin returned 404 Not Found for {request.url}", 404)
            if kind == "daemon-timeout":  # the daemon's deadline, what was left of dfget's
                raise DownloadTimeout(f"download timed out after {request.timeout_s:g}s")
            if kind == "many":
                async for event in self._many(name):
                    yield event
                return
            data = b"" if kind == "empty" else self.data
            path = self.task_dir / f"{kind}-{name}"
            path.touch()
            self.task_paths[request.url] = path  # after the file exists: the test's thread stats it at once
            os.truncate(path, len(data))
            fd, write_fd = os.open(path, os.O_RDONLY), os.open(path, os.O_WRONLY)
            try:
                yield Started(f"task-{name}", len(data), PIECE, str(path), fd)
                numbers = list(range(-(-len(data) // PIECE)))
                random.Random(name).shuffle(numbers)
                for i in range(0, len(numbers), 2):
                    batch = numbers[i : i + 2]
                    for n in batch:
                        os.pwrite(write_fd, data[n * PIECE : (n + 1) * PIECE], n * PIECE)
                    yield PiecesReady(tuple(batch))
                    if kind == "stall":
                        await asyncio.sleep(3600)
                    if kind == "fail-mid":
                        raise SourceError("origin reset the connection", 0)
                    await asyncio.sleep(0.002)
                yield Finished()
            finally:
                os.close(fd)
                os.close(write_fd)
        finally:
            self.closed[request.url].set()

    async def _many(self, name: str) -> AsyncIterator[DownloadEvent]:
        """A task complete in the cache, of more pieces than one event may list: one batch of them all."""
        path = self.task_dir / f"many-{name}"
        path.touch()
        os.truncate(path, MANY * PIECE)  # sparse
        fd = os.open(path, os.O_RDONLY)
        try:
            yield Started(f"task-{name}", MANY * PIECE, PIECE, str(path), fd)
            yield PiecesReady(tuple(range(MANY)))
            yield Finished()
        finally:
            os.close(fd)


class ServerThread:
    def __init__(self, backend: FakeBackend, socket_path: Path, mode: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = LocalApiServer(backend, socket_path, mode, "")

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "run" / "dfdaemon.sock"
        (root / "tasks").mkdir()
        self.backend = FakeBackend(root / "tasks")
        self.server = ServerThread(self.backend, self.socket, 0o660)
        self._n = 0

    def url(self, kind: str) -> str:
        self._n += 1
        return f"{ORIGIN}/{kind}/{self._n}"

    def dfget(self, url: str, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dfly.cli.dfget", url, "-O", str(output), "-e", str(self.socket)]
        return subprocess.run([*cmd, "--no-progress", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix="dfly-lapi-"))  # short: unix socket paths are limited to 108 bytes
    try:
        h = Harness(root)
        h.server.start()
        try:
            yield h
        finally:
            h.server.stop()
    finally:
        shutil.rmtree(root)


@pytest.fixture
def out_dir(harness: Harness) -> Path:
    return Path(tempfile.mkdtemp(dir=harness.root, prefix="out-"))


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".dfget-" in p.name]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dfget: ")
    return lines[0]


def failed(result: subprocess.CompletedProcess[str], out: Path, code: int = 1) -> str:
    """The one stderr line of a failed dfget, after checking nothing was left behind."""
    assert result.returncode == code, result.stderr
    assert not out.exists()
    assert leftovers(out.parent) == []
    return one_line(result.stderr)


@pytest.mark.parametrize("kind", ["file", "empty"])
def test_download_copies_every_piece(harness: Harness, out_dir: Path, kind: str) -> None:
    assert harness.socket.stat().st_mode & 0o777 == 0o660
    out = out_dir / "file.bin"
    result = harness.dfget(harness.url(kind), out)
    assert (result.returncode, result.stderr) == (0, "")
    assert out.read_bytes() == (harness.backend.data if kind == "file" else b"")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644 & ~umask
    assert leftovers(out_dir) == []


def test_request_fields_reach_the_backend(harness: Harness, out_dir: Path) -> None:
    url = harness.url("file") + "?b=2&X-Amz-Signature=s"
    args = ["--tag", "t1", "--application", "app", "--filtered-query-param", "b", "-H", "Authorization: x y"]
    args += ["--piece-length", "4MiB", "--disable-back-to-source", "--timeout", "10m"]
    result = harness.dfget(url, out_dir / "f", *args)
    assert result.returncode == 0, result.stderr
    request = harness.backend.requests[-1]
    assert (request.url, request.tag, request.application) == (url, "t1", "app")
    assert (request.headers, request.piece_length) == ({"Authorization": "x y"}, 4 * 1024 * 1024)
    assert request.filtered_query_params == (*DEFAULT_FILTERED_QUERY_PARAMS, "b")
    assert request.disable_back_to_source is True
    assert 590 < request.timeout_s <= 600


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "crc32"])
def test_digest_ok(harness: Harness, out_dir: Path, algorithm: str) -> None:
    data, out = harness.backend.data, out_dir / "ok"
    value = str(zlib.crc32(data)) if algorithm == "crc32" else hashlib.new(algorithm, data).hexdigest()
    result = harness.dfget(harness.url("file"), out, "--digest", f"{algorithm}:{value}")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == harness.backend.data


def test_digest_mismatch_leaves_nothing(harness: Harness, out_dir: Path) -> None:
    out = out_dir / "bad"
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    line = failed(harness.dfget(harness.url("file"), out, "--digest", wrong), out)
    assert "digest mismatch: expected " + wrong in line
    assert "got sha256:" + hashlib.sha256(harness.backend.data).hexdigest() in line


def test_existing_output_needs_overwrite(harness: Harness, out_dir: Path) -> None:
    out = out_dir / "exists"
    out.write_bytes(b"mine")
    before = len(harness.backend.requests)
    result = harness.dfget(harness.url("file"), out)
    assert result.returncode == 2
    assert "already exists" in one_line(result.stderr)
    assert out.read_bytes() == b"mine"
    assert len(harness.backend.requests) == before  # refused before asking the daemon
    result = harness.dfget(harness.url("file"), out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == harness.backend.data
    assert leftovers(out_dir) == []


def test_origin_404_is_one_line(harness: Harness, out_dir: Path) -> None:
    out = out_dir / "missing"
    url = harness.url("404")
    assert failed(harness.dfget(url, out), out) == f"dfget: origin returned 404 Not Found for {url}"


# A nameless temporary file (O_TMPFILE, the default) has no name to leave whatever dfget does; with
# --force-hard-link the temporary file has a name (a link to the task file) that dfget must remove.
NAMED_OR_NOT = pytest.mark.parametrize("extra", [(), ("--force-hard-link",)], ids=["nameless", "named"])


@NAMED_OR_NOT
def test_failure_after_start_leaves_nothing(harness: Harness, out_dir: Path, extra: tuple[str, ...]) -> None:
    out = out_dir / "partial"
    assert "origin reset the connection" in failed(harness.dfget(harness.url("fail-mid"), out, *extra), out)


def test_unreachable_daemon_names_the_socket(harness: Harness, out_dir: Path) -> None:
    sock = harness.root / "nowhere.sock"
    out = out_dir / "x"
    line = failed(harness.dfget(harness.url("file"), out, "-e", str(sock)), out)
    assert line == f"dfget: cannot reach the daemon at {sock}: No such file or directory"
    line = failed(harness.dfget(harness.url("file"), out, "-e", str(out_dir)), out)  # a directory
    assert line.startswith(f"dfget: cannot reach the daemon at {out_dir}: not a socket")


def test_force_hard_link_shares_the_task_inode(harness: Harness, out_dir: Path) -> None:
    out = out_dir / "linked"
    url = harness.url("file")
    result = harness.dfget(url, out, "--force-hard-link")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_ino == harness.backend.task_paths[url].stat().st_ino
    assert out.read_bytes() == harness.backend.data
    assert leftovers(out_dir) == []


def test_copy_is_independent_of_the_task_file(harness: Harness, out_dir: Path) -> None:
    out = out_dir / "copy"
    url = harness.url("file")
    result = harness.dfget(url, out)
    assert result.returncode == 0, result.stderr
    task = harness.backend.task_paths[url]
    assert out.stat().st_ino != task.stat().st_ino
    with open(out, "r+b") as f:
        f.write(b"\xff" * 4096)
    assert task.read_bytes() == harness.backend.data


def test_timeout_cancels_the_download(harness: Harness, out_dir: Path) -> None:
    out = out_dir / "slow"
    url = harness.url("stall")
    assert failed(harness.dfget(url, out, "--timeout", "1s"), out) == "dfget: download timed out after 1s"
    assert harness.backend.closed[url].wait(5), "the server did not close the iterator of a gone client"


def test_a_timeout_is_told_in_the_users_own_terms(harness: Harness, out_dir: Path) -> None:
    """Plain seconds get their unit; the daemon's deadline (set to what was left of dfget's, so it may
    pass first) is told as dfget's own, not as '2.99928s'."""
    out = out_dir / "slow"
    assert failed(harness.dfget(harness.url("stall"), out, "--timeout", "1"), out) == (
        "dfget: download timed out after 1s"
    )
    url = harness.url("daemon-timeout")
    assert failed(harness.dfget(url, out, "--timeout", "10m"), out) == "dfget: download timed out after 10m"


@NAMED_OR_NOT
@pytest.mark.parametrize(
    ("signum", "code", "message"),
    [
        (signal.SIGINT, 130, "dfget: interrupted"),
        (signal.SIGTERM, 143, "dfget: terminated"),
        (signal.SIGHUP, 129, "dfget: hung up"),  # the terminal or SSH session went away
    ],
)
def test_signals_remove_the_temporary_file(
    harness: Harness, out_dir: Path, signum: int, code: int, message: str, extra: tuple[str, ...]
) -> None:
    out = out_dir / "interrupted"
    url = harness.url("stall")
    cmd = [sys.executable, "-m", "dfly.cli.dfget", url, "-O", str(out), "-e", str(harness.socket)]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored: give dfget the default disposition, as an interactive shell would.
    proc = subprocess.Popen(
        [*cmd, "--no-progress", *extra],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for_request(harness, url)  # its temporary file exists before it asks the daemon
        if extra:  # the named temporary file is there to be removed: a link to the task file
            wait_for_linked_temporary(out_dir, harness.backend.task_paths[url])
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert one_line(stderr) == message
    assert not out.exists()
    assert leftovers(out_dir) == []
    assert harness.backend.closed[url].wait(5)


def wait_for_request(harness: Harness, url: str) -> None:
    wait_until("dfget asked the daemon", lambda: url in harness.backend.task_paths, timeout_s=10)


def wait_for_linked_temporary(out_dir: Path, task_path: Path) -> None:
    """Until a temporary file in `out_dir` is a hard link to the task file (--force-hard-link)."""
    inode = task_path.stat().st_ino

    def linked() -> bool:
        with os.scandir(out_dir) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # replaced by the link meanwhile
                    if ".dfget-" in entry.name and entry.stat().st_ino == inode:
                        return True
        return False

    wait_until("dfget linked its temporary file to the task file", linked, timeout_s=10)


def test_a_dfget_killed_outright_leaves_no_file(harness: Harness, out_dir: Path) -> None:
    """SIGKILL (the OOM killer, kill -9) runs no clean-up: the temporary file has no name to leave."""
    url = harness.url("stall")
    cmd = [
        sys.executable,
        "-m",
        "dfly.cli.dfget",
        url,
        "-O",
        str(out_dir / "killed"),
        "-e",
        str(harness.socket),
    ]
    proc = subprocess.Popen([*cmd, "--no-progress"], stderr=subprocess.DEVNULL)
    try:
        wait_for_request(harness, url)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert list(out_dir.iterdir()) == []
    assert harness.backend.closed[url].wait(5)


def raw_exchange(path: Path, payload: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        if not payload.endswith(b"\n"):
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json\n", "not valid JSON"),
        (b"[1, 2]\n", "op 'download' or 'stats'"),
        (b'{"op": "delete"}\n', "op 'download' or 'stats'"),
        (b'{"op": "download"}\n', "'url' is required"),
        (b'{"op": "download", "url": "http://a/", "colour": 1}\n', "unknown request fields"),
        (b'{"op": "stats", "colour": 1}\n', "unknown request fields"),
        (b'{"op": "download", "url": "http://a/", "timeout_s": "soon"}\n', "'timeout_s'"),
        (b'{"op": "download", "url": "http://a/", "disable_back_to_source": 1}\n', "wrong type"),
        (b'{"op": "download", "url": "http://a/", "piece_length": 1000}\n', "power of two"),
        (b'{"op": "download", "url": "http://a/", "headers": {"a": 1}}\n', "'headers' must map strings"),
        (b'{"op": "stats"', "not terminated"),
        (b'{"op": "download", "url": "http://a/", "timeout_s": ' + b"9" * 400 + b"}\n", "finite"),
        (b'{"op": "download", "url": "http://a/", "timeout_s": 1e999}\n', "finite"),
        (b'{"op": "download", "url": "http://a/", "headers": ' + b"[" * 100_000 + b"\n", "nested too deeply"),
        # a seed would refuse its trigger (the download then read the origin itself): refused here alike
        (
            json.dumps(
                {"op": "download", "url": "http://a/", "headers": {f"X-{n}": "v" for n in range(257)}}
            ).encode()
            + b"\n",
            "257 request headers of 1432 bytes: at most 256 and 262144 bytes",
        ),
    ],
)
def test_bad_requests_get_usage_errors(harness: Harness, payload: bytes, fragment: str) -> None:
    (event,) = raw_exchange(harness.socket, payload)
    assert (event["event"], event["kind"]) == ("error", "usage")
    assert fragment in str(event["message"])
    (stats,) = raw_exchange(harness.socket, b'{"op": "stats"}\n')  # still serving
    assert stats["event"] == "stats"
    assert isinstance(stats["stats"], dict)
    assert "requests" in stats["stats"]


def test_a_large_batch_of_pieces_goes_out_as_several_events(harness: Harness) -> None:
    """A task complete in the cache was announced in one line of every piece number: past ~2.2 million
    pieces (64 KiB pieces of a 137 GiB file) longer than dfget takes (16 MiB), so dfget failed at once."""
    request = json.dumps({"op": "download", "url": harness.url("many"), "timeout_s": 10}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(harness.socket))
        s.sendall(request)
        data = b""
        while more := socket.recv_fds(s, 1 << 20, 4):
            chunk, fds, _, _ = more
            for fd in fds:
                os.close(fd)
            if not chunk:
                break
            data += chunk
    events = [json.loads(line) for line in data.splitlines()]
    batches = [event["pieces"] for event in events if event["event"] == "pieces"]
    assert [len(batch) for batch in batches] == [65_536, 65_536, MANY - 2 * 65_536]
    assert [n for batch in batches for n in batch] == list(range(MANY))
    assert events[-1] == {"event": "finished"}


def test_started_event_passes_a_read_only_fd(harness: Harness) -> None:
    url = harness.url("file")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(harness.socket))
        s.sendall(json.dumps({"op": "download", "url": url, "timeout_s": 10}).encode() + b"\n")
        data, fds = b"", list[int]()
        while not data.endswith(b"\n"):
            more, more_fds, _, _ = socket.recv_fds(s, 65536, 4)
            data, fds = data + more, fds + more_fds
    started = json.loads(data.split(b"\n")[0])
    assert (started["event"], started["content_length"], started["piece_length"]) == ("started", SIZE, PIECE)
    assert len(fds) == 1
    try:
        assert os.fstat(fds[0]).st_ino == Path(started["task_path"]).stat().st_ino
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.write(fds[0], b"x")
    finally:
        os.close(fds[0])
    assert harness.backend.closed[url].wait(5)


async def start_and_close(path: Path, group: str = "") -> None:
    server = LocalApiServer(FakeBackend(path.parent), path, 0o660, group)
    await server.start()
    await server.close()


def test_stale_socket_is_replaced_and_live_one_refused() -> None:
    root = Path(tempfile.mkdtemp(prefix="dfly-stale-"))
    path = root / "sub" / "d.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # a socket file nobody listens on
    server = ServerThread(FakeBackend(root), path, 0o600)
    server.start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(ConfigError, match="another process is listening"):
            asyncio.run(start_and_close(path))
        assert raw_exchange(path, b'{"op": "stats"}\n')[0]["event"] == "stats"
    finally:
        try:
            server.stop()
            assert not path.exists()
        finally:  # the directory is outside tmp_path: removed even when the check above fails
            shutil.rmtree(root)


def test_setup_errors_are_config_errors(tmp_path: Path) -> None:
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        asyncio.run(start_and_close(regular))
    assert regular.read_text() == "keep"
    with pytest.raises(ConfigError, match="no such group"):
        asyncio.run(start_and_close(tmp_path / "s.sock", "no-such-group-dfly"))
    assert not (tmp_path / "s.sock").exists()
