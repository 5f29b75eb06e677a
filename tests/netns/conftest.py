"""Fixtures of the network-namespace tests: skip the directory only where namespaces cannot be made.

Rules: the skip reason names the cause (not root, no `ip`, `ip netns add` refused); a missing optional
tool never skips (nginx falls back to `dfly.devtools.origin`). Before the first test, namespaces and
links left by a crashed earlier run (a testbed prefix whose pid is dead) are removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .netns import cleanup_stale

_netns_status: list[str] = []  # [""] = usable, [reason] = skip; computed once per session


def _netns_unusable() -> str:
    """Why network namespaces cannot be created here ("" if they can)."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns add)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "network-namespace tests need iproute2 (`ip`, `tc`)"
    name = f"dfn{os.getpid():x}x999-probe"
    add = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    if add.returncode != 0:
        return f"`ip netns add` failed here: {add.stderr.strip()}"
    return ""


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    if not _netns_status:
        reason = _netns_unusable()
        if not reason:
            cleanup_stale()
        _netns_status.append(reason)
    if _netns_status[0]:
        pytest.skip(_netns_status[0])
