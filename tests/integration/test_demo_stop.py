"""`make demo` stopped mid-download (SIGTERM, as `timeout` or a CI runner sends): it exits within
seconds with 130 and leaves no process behind (scheduler, daemons, dfgets, origin)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def session_processes(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    found.append(int(entry))
            except ProcessLookupError:
                continue
    return found


def test_a_stopped_demo_exits_promptly_and_leaves_nothing() -> None:
    # 64 MiB at a seed uplink of 2 MiB/s: the dfgets run for about half a minute
    command = [
        sys.executable,
        "-m",
        "dfly.cli.demo",
        "--size-mib",
        "64",
        "--peers",
        "2",
        "--seed-upload-mib-s",
        "2",
    ]
    demo = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("running dfget"):
                break
        else:
            pytest.fail(f"the demo never started its downloads: {demo.stderr.read() if demo.stderr else ''}")
        started = time.monotonic()
        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=60)
        took = time.monotonic() - started
        assert demo.returncode == 130, err
        assert "demo: interrupted SIGTERM" in err
        assert took < 20.0, f"the demo took {took:.1f} s to stop"
        deadline = time.monotonic() + 10
        while (left := session_processes(demo.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"left running: {left}"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
