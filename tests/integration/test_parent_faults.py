"""A parent that dies, stalls or serves corrupt bytes in the middle of a download (issue 4, peer level).

Real processes: scheduler, seed and three peers on 127.0.0.1, a real origin. peer-1 and peer-2 hold
the file (their uploads capped so that a download from them takes seconds), the seed is then killed,
and peer-3 downloads from peer-1 and peer-2. While peer-1 is sending, it is SIGKILLed, SIGSTOPped or
has its task file's bytes flipped. peer-3 must finish with the right SHA-256 from peer-2 alone: no
byte from the origin, nothing from peer-1 after the fault (for the corrupt case: no bad byte kept).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import dfget_cmd, stats, wait_until

from dfly.cluster import LocalCluster, Member
from dfly.common.digest import file_digest
from dfly.common.pieces import MiB
from dfly.devtools.origin import Origin, make_file

pytestmark = pytest.mark.integration

FILE_BYTES = 48 * MiB
PARENT_RATE = 8 * MiB  # bytes/s each of peer-1 and peer-2 may upload
PIECE_TIMEOUT_S = 2.0  # peer-3's download.piece_timeout_s (default 30)
DFGET_TIMEOUT_S = 60.0
INVERT = bytes(255 - b for b in range(256))


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www") as server:
        yield server


def uploaded(member: Member) -> int:
    return int(stats(member)["upload_bytes"])


def flip_task_file(member: Member) -> None:
    """Invert every byte of the member's only task file (its recorded digests stay as they were)."""
    [path] = [p for p in (member.data_dir / "tasks").rglob("*") if p.is_file()]
    with open(path, "r+b") as f:
        while chunk := f.read(1 << 20):
            f.seek(-len(chunk), os.SEEK_CUR)
            f.write(chunk.translate(INVERT))


def run_fault(
    origin: Origin,
    tmp_path: Path,
    fault: Callable[[LocalCluster, Member], None],
    logged: str,
    child_download: dict[str, Any] | None = None,
    dfget_extra: tuple[str, ...] = (),
) -> None:
    """Break peer-1 with `fault` mid-download; peer-3's log must show `logged` on a line naming peer-1.
    `child_download`: more of peer-3's `download` section; `dfget_extra`: flags of every dfget."""
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=91)
    url = origin.url("/f.bin")
    capped: dict[str, dict[str, Any]] = {"upload": {"rate_limit_bytes_per_s": PARENT_RATE}}
    overrides = {
        "peer-1": capped,
        "peer-2": capped,
        "peer-3": {"download": {"piece_timeout_s": PIECE_TIMEOUT_S, **(child_download or {})}},
    }
    with LocalCluster(tmp_path / "c", peers=3, daemon_overrides=overrides) as cluster:
        p1, p2, p3 = (cluster.member(f"peer-{i}") for i in (1, 2, 3))
        for holder in (p1, p2):
            done = subprocess.run(
                dfget_cmd(holder, url, tmp_path / f"{holder.name}.out", *dfget_extra), timeout=DFGET_TIMEOUT_S
            )
            assert done.returncode == 0
        cluster.kill_member("seed")
        origin_before, p2_before, p1_before = origin.bytes_sent, uploaded(p2), uploaded(p1)
        child = subprocess.Popen(
            dfget_cmd(p3, url, tmp_path / "out", *dfget_extra), stderr=subprocess.PIPE, text=True
        )
        try:
            wait_until("peer-1 sends peer-3 2 MiB", lambda: uploaded(p1) - p1_before >= 2 * MiB)
            assert child.poll() is None, "peer-3 finished before the fault"
            fault(cluster, p1)
            _, err = child.communicate(timeout=DFGET_TIMEOUT_S)
        finally:
            if child.poll() is None:
                child.kill()
            if p1.alive():
                os.kill(p1.pid, signal.SIGCONT)
        assert child.returncode == 0, err
        assert file_digest(tmp_path / "out").value == digest
        assert origin.bytes_sent == origin_before, "peer-3 went to the origin"
        got = stats(p3)["download_bytes"]
        assert isinstance(got, dict)
        assert got["back_to_source"] == 0
        assert got["remote_peer"] >= FILE_BYTES
        assert uploaded(p2) - p2_before >= FILE_BYTES // 4  # peer-2 served the rest
        p1_host = str(p1.ready["host_id"])
        lines = p3.log_path.read_text(errors="replace").splitlines()
        assert any(p1_host in line and logged in line for line in lines), f"no '{logged}' for peer-1"


def test_parent_killed_mid_piece(origin: Origin, tmp_path: Path) -> None:
    run_fault(origin, tmp_path, lambda cluster, parent: cluster.kill_member(parent.name), "closed")


def test_parent_that_stalls_is_dropped_after_the_piece_timeout(origin: Origin, tmp_path: Path) -> None:
    run_fault(
        origin, tmp_path, lambda _cluster, parent: os.kill(parent.pid, signal.SIGSTOP), "sent no piece for"
    )


def test_parent_serving_corrupt_bytes_is_dropped_and_nothing_bad_is_kept(
    origin: Origin, tmp_path: Path
) -> None:
    run_fault(origin, tmp_path, lambda _cluster, parent: flip_task_file(parent), "for a corrupt piece")


def test_parent_that_stalls_holding_every_buffer_is_dropped(origin: Origin, tmp_path: Path) -> None:
    """peer-3's receive buffers (1 MiB: one piece of 1 MiB) wait on the stopped peer-1. The request loop
    used to wait for a buffer before it checked for expired requests, so it waited for ever: no piece
    timeout, no other parent, the download (and every other one on the host) stuck. (The default 32 MiB
    holds two 16 MiB pieces: every file of 4 GiB or more.)"""
    run_fault(
        origin,
        tmp_path,
        lambda _cluster, parent: os.kill(parent.pid, signal.SIGSTOP),
        "sent no piece for",
        child_download={"buffer_bytes": MiB},
        dfget_extra=("--piece-length", "1MiB"),
    )
