"""The servers raise their open-files soft limit to the hard limit at start (a daemon holds far more
descriptors than the usual soft 1,024), and say so when even the hard limit is below what the config may
hold at once. Real processes under `prlimit`; each is stopped right after start by a port the test holds
(the limit is checked before any listener)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


def run_limited(argv: list[str], soft: int, hard: int) -> str:
    limited = ["prlimit", f"--nofile={soft}:{hard}", "--", sys.executable, "-m", *argv]
    done = subprocess.run(limited, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr  # stopped by the taken port, as intended
    return done.stderr


def daemon_argv(tmp_path: Path, taken_port: int) -> list[str]:
    listener = {"ip": "127.0.0.1", "port": 0}
    config = {
        "scheduler": {"addrs": ["127.0.0.1:9"]},
        "storage": {"dir": str(tmp_path / "data")},
        "local_api": {"socket": str(tmp_path / "d.sock")},
        **{key: dict(listener) for key in ("control", "health", "metrics", "proxy")},
        "piece": {"ip": "127.0.0.1", "port": taken_port},
    }
    path = tmp_path / "dfdaemon.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["dfly.cli.dfdaemon", "--config", str(path)]


def test_the_daemon_raises_its_limit_and_warns_when_the_hard_limit_is_too_low(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        argv = daemon_argv(tmp_path, taken.getsockname()[1])
        roomy = run_limited(argv, 256, 16384)
        tight = run_limited(argv, 256, 1000)
    assert "open files limit raised from 256 to 16384 (the hard limit)" in roomy
    assert "may hold" not in roomy
    assert "open files limit raised from 256 to 1000 (the hard limit)" in tight
    assert "the open files limit is 1000 but this config may hold 5696 descriptors at once" in tight


def test_the_scheduler_raises_its_limit(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        stderr = run_limited(["dfly.cli.dfly", "scheduler", "--port", str(port)], 256, 16384)
    assert "open files limit raised from 256 to 16384 (the hard limit)" in stderr
