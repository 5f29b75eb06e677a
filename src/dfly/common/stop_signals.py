"""The signals that ask dfly's long-running commands (dfdaemon, `dfly scheduler`, `dfly up`) for a clean
stop: Ctrl-C (SIGINT), a service manager's SIGTERM, and SIGHUP, sent when the terminal or SSH session
they run in goes away (by default it killed the process uncleanly: no clean-shutdown marker, and `dfly
up` left its cluster running). dfget handles these itself (its exit status names the signal)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
