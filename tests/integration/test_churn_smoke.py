"""bench/churn.py in small: peer daemons SIGKILLed and restarted while every host downloads.

Four hosts, two 8 MiB files per round, a kill every 1.5 s, for a few seconds: no download on a host
that stayed up may fail, no output may be wrong, and the run must print its one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "churn.py"


def test_short_churn_run_loses_and_corrupts_nothing() -> None:
    cmd = [sys.executable, str(BENCH), "--hosts", "4", "--files", "2", "--file-mib", "8"]
    cmd += ["--duration-s", "5", "--kill-every-s", "1.5", "--seed", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert figures["kills"] >= 1
    assert figures["completed"] >= 8
    assert figures["failed"] == 0, figures["failures"]
    assert figures["corrupt"] == 0
    assert figures["origin_copies_per_round"] <= 2 * figures["files_per_round"]
