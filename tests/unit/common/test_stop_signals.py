"""exit_on_sigterm: a SIGTERM runs the process's clean-up (its `finally` and `with` exits) and exits 143."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, time
from pathlib import Path
from dfly.devtools.stop_signals import exit_on_sigterm
exit_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)  # the bench's work, interrupted by the signal
finally:
    Path(sys.argv[1]).write_text("cleaned up")
"""


def test_a_sigterm_unwinds_the_process_instead_of_killing_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert marker.read_text() == "cleaned up"
