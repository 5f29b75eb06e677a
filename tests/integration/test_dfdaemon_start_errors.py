"""dfdaemon refuses a config it cannot run with in one line and exit 2, never a traceback.

Real processes: `python -m dfly.cli.dfdaemon --config FILE` with every listener on 127.0.0.1 port 0
except the one under test, whose port a socket of the test holds (address in use), and configs that
fail validation (no scheduler, a host name where an IP address is needed). A daemon that could not bind
leaves its storage closed cleanly (the clean-shutdown marker is written). A daemon stopped while its
first announce is still pending stops at once and never says it is ready.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration


def base_config(tmp_path: Path) -> dict[str, Any]:
    listener = {"ip": "127.0.0.1", "port": 0}
    return {
        "scheduler": {"addrs": ["127.0.0.1:9"]},  # never reached: the daemon stops before announcing
        "storage": {"dir": str(tmp_path / "data")},
        "local_api": {"socket": str(tmp_path / "d.sock")},
        **{key: dict(listener) for key in ("piece", "control", "health", "metrics", "proxy")},
    }


def run_daemon(tmp_path: Path, config: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "dfdaemon.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "dfly.cli.dfdaemon", "--config", str(path), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("key", ["piece", "control", "health", "metrics", "proxy"])
def test_a_listener_whose_port_is_taken_is_one_line_and_exit_2(tmp_path: Path, key: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = base_config(tmp_path)
        config[key]["port"] = port
        done = run_daemon(tmp_path, config)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"dfdaemon: {key}: cannot listen on 127.0.0.1:{port}: Address already in use"
    ), done.stderr
    assert (tmp_path / "data" / "clean-shutdown").exists()  # what was up was closed in order


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        (
            "scheduler",
            {"addrs": []},
            "scheduler.addrs: Value error, at least one scheduler address (host:port) is needed",
        ),
        ("host", {"advertise_ip": "node-7"}, "host.advertise_ip: Value error, 'node-7' is not an IP address"),
        ("proxy", {"ip": "localhost", "port": 0}, "proxy.ip: Value error, 'localhost' is not an IP address"),
        (
            "proxy",
            {"ip": "127.0.0.1", "port": 0, "basic_auth_password": "s3cret"},
            "proxy: Value error, basic_auth_username and basic_auth_password are set together or not at all",
        ),
        (
            "log_level",
            "verbose",
            "log_level: Value error, 'verbose' is not a log level (debug, info, warning, error, critical)",
        ),
    ],
)
def test_an_invalid_address_is_a_config_error(tmp_path: Path, section: str, value: Any, message: str) -> None:
    config = base_config(tmp_path)
    config[section] = value
    done = run_daemon(tmp_path, config)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"dfdaemon: invalid config key {message}", done.stderr


def test_seed_flag_is_checked_like_the_config_key(tmp_path: Path) -> None:
    """`--seed` on a leech config is refused as `seed_peer.enable: true` in the file is."""
    config = base_config(tmp_path)
    config["upload"] = {"disable_shared": True}
    done = run_daemon(tmp_path, config, "--seed")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "dfdaemon: invalid config key (top level): Value error, "
        "a seed peer must upload: seed_peer.enable excludes upload.disable_shared"
    ), done.stderr


@pytest.mark.parametrize(
    ("where", "message"), [("missing/ready.json", "does not exist"), (".", "is a directory")]
)
def test_a_ready_file_that_could_never_be_written_is_refused_at_start(
    tmp_path: Path, where: str, message: str
) -> None:
    done = run_daemon(tmp_path, base_config(tmp_path), "--ready-file", str(tmp_path / where))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("dfdaemon: --ready-file"), done.stderr
    assert message in done.stderr


def first_retry_line(tmp_path: Path, scheduler_addr: str) -> str:
    """The daemon's first `cannot announce to scheduler` line with `scheduler_addr` as its scheduler."""
    config = base_config(tmp_path)
    config["scheduler"] = {"addrs": [scheduler_addr]}
    path = tmp_path / "dfdaemon.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "dfly.cli.dfdaemon", "--config", str(path)]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # the daemon retries until stopped: read until the first retry line
                if "cannot announce to scheduler" in line:
                    return line
            raise AssertionError("the daemon ended without a retry line")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_a_scheduler_host_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    """gRPC reports an unresolvable scheduler host only as DEADLINE_EXCEEDED; the retry line says why."""
    line = first_retry_line(tmp_path, "scheduler.invalid:8002")
    assert "scheduler.invalid: no such host" in line, line


def test_an_unreachable_scheduler_gets_a_hint_at_tls_too(tmp_path: Path) -> None:
    """A failed TLS handshake (one side with security.tls, the other without) looks like any scheduler
    that does not answer: DEADLINE_EXCEEDED, with the reason only in gRPC's own log lines."""
    line = first_retry_line(tmp_path, "127.0.0.1:1")  # nothing listens there
    assert "its security.tls differs: it is off here" in line, line


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_the_first_announce_is_pending_is_prompt_and_never_ready(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """A scheduler that never answers holds the first announce for its whole deadline (10 s); SIGTERM
    then must not wait for it, and the daemon must not log that it is ready on its way out. SIGHUP (the
    terminal closed) stops it the same way: it killed the daemon uncleanly."""
    config = base_config(tmp_path)
    config["scheduler"] = {"addrs": ["127.0.0.1:1"]}  # nothing listens there
    path = tmp_path / "dfdaemon.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "dfly.cli.dfdaemon", "--config", str(path)]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            for line in proc.stderr:  # the listeners are up: the announce comes next
                lines.append(line)
                if "local API listening on" in line:
                    break
            else:
                raise AssertionError(f"the daemon ended before it listened: {''.join(lines)}")
            proc.send_signal(stop)
            stopped_at = time.monotonic()
            rest = proc.stderr.read()
            proc.wait(timeout=30)
            took = time.monotonic() - stopped_at
        finally:
            if proc.poll() is None:
                proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert took < 5, f"the stop waited {took:.1f} s for the announce"
    assert " ready (" not in log
    assert "stopped" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_storage_dir_that_is_a_file_is_a_config_error(tmp_path: Path, below: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    config = base_config(tmp_path)
    config["storage"]["dir"] = str(blocker / below) if below else str(blocker)
    done = run_daemon(tmp_path, config)
    assert done.returncode == 2, done.stderr
    expected = (
        f"dfdaemon: storage.dir: cannot create {blocker / below}: {blocker} is not a directory"
        if below
        else f"dfdaemon: storage.dir: {blocker} is not a directory"
    )
    assert done.stderr.strip() == expected, done.stderr
    assert blocker.read_bytes() == b""


def test_a_storage_dir_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    config["storage"]["dir"] = "/proc/dfly-storage"  # procfs makes no directories, not even for root
    done = run_daemon(tmp_path, config)
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        == "dfdaemon: storage.dir: cannot create /proc/dfly-storage: No such file or directory"
    )


@pytest.mark.parametrize("delay_s", [0.5, 1.0])
def test_a_sigint_during_start_up_stops_the_daemon_cleanly(tmp_path: Path, delay_s: float) -> None:
    """Ctrl-C while the daemon loads or opens its storage: exit 0, no traceback, the storage closed. A
    SIGINT that cancelled the storage's open left the process hung for ever, ignoring SIGTERM too, and
    holding the storage dir's lock (the next start: 'in use by another process')."""
    path = tmp_path / "dfdaemon.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    argv = [sys.executable, "-m", "dfly.cli.dfdaemon", "--config", str(path)]
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(delay_s)  # lands somewhere in the start-up: imports, config, storage recovery, listeners
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_a_storage_dir_with_a_nul_byte_is_a_config_error(tmp_path: Path) -> None:
    """Python refuses such a path with ValueError, which was a traceback."""
    config = base_config(tmp_path)
    config["storage"]["dir"] = str(tmp_path / "a\0b")
    done = run_daemon(tmp_path, config)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "dfdaemon: storage.dir: a path cannot contain a NUL byte"
