"""`dfly up` end to end against fake members: table, cluster.json, SIGTERM exit 0, a dying member exit 1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.cli.dfly import main

FAKE = str(Path(__file__).with_name("fake_member.py"))
WRAPPER = """
import sys
from dfly.cluster import LocalCluster
from dfly.cli.dfly import main
LocalCluster.__init__.__kwdefaults__["scheduler_cmd"] = [sys.executable, {fake!r}, "ok"]
LocalCluster.__init__.__kwdefaults__["daemon_cmd"] = [sys.executable, {fake!r}, "ok"]
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def _running_up(tmp_path: Path, with_dir: bool) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`dfly up --peers 2` with fake members (in `--dir tmp_path/c`, or without `--dir`: in a new temp
    dir under tmp_path/t), once its cluster.json is written. Whatever a failed test leaves running
    (`dfly up` killed outright leaves its members behind) is killed on the way out."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(fake=FAKE))
    temp_root = tmp_path / "t"
    temp_root.mkdir()
    dir_args = ["--dir", str(tmp_path / "c")] if with_dir else []
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), "up", "--peers", "2", *dir_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(temp_root)},
    )
    pattern = "c/cluster.json" if with_dir else "t/dfly-up-*/cluster.json"
    description: Path | None = None
    try:
        deadline = time.monotonic() + 30
        while description is None:
            description = next(iter(tmp_path.glob(pattern)), None)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no cluster.json"
            time.sleep(0.05)
        yield proc, description.parent
    finally:
        if proc.poll() is None:
            proc.kill()
        if description is not None:
            for member in json.loads(description.read_text())["processes"]:
                if not _gone(member["pid"]):
                    os.kill(member["pid"], signal.SIGKILL)
        proc.communicate(timeout=30)  # members gone too: nothing holds its output pipe open


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    with _running_up(tmp_path, with_dir=True) as running:
        yield running


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_stops_everything_with_exit_0(up: tuple[subprocess.Popen[str], Path]) -> None:
    proc, cluster_dir = up
    pids = [p["pid"] for p in json.loads((cluster_dir / "cluster.json").read_text())["processes"]]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "peer-2" in out
    assert "dfget -e" in out
    assert all(_gone(pid) for pid in pids)


def test_without_dir_it_runs_in_a_new_temp_dir(tmp_path: Path) -> None:
    """The default of `--dir` (it crashed with a TypeError before anything started)."""
    with _running_up(tmp_path, with_dir=False) as (proc, cluster_dir):
        assert cluster_dir.name.startswith("dfly-up-")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"dfly up: starting in {cluster_dir}" in out


def test_a_member_dying_stops_the_rest_with_exit_1(up: tuple[subprocess.Popen[str], Path]) -> None:
    proc, cluster_dir = up
    procs = json.loads((cluster_dir / "cluster.json").read_text())["processes"]
    seed = next(p for p in procs if p["name"] == "seed")
    os.kill(seed["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert "seed exited" in out
    assert all(_gone(p["pid"]) for p in procs)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["up", "--peers", "-1"]) == 2
    assert capsys.readouterr().err == "dfly up: --peers must be >= 0\n"
    a_file = tmp_path / "a-file"
    a_file.touch()
    for not_a_dir in (a_file, a_file / "sub"):  # was exit 1, after "starting" and "stopping"
        assert main(["up", "--dir", str(not_a_dir)]) == 2
        assert capsys.readouterr().err == f"dfly up: --dir {not_a_dir} is not a directory\n"
    assert main(["up", "--seed-upload-limit", "-5"]) == 2
    capsys.readouterr()
    # was found only by the seed's config check, after the scheduler had started: two lines, exit 1
    assert main(["up", "--seed-upload-limit", str(2**53 + 1)]) == 2
    assert capsys.readouterr().err == f"dfly up: --seed-upload-limit must be between 0 and {2**53}\n"
    assert main(["up", "--dir", ""]) == 2  # was the current directory
    assert capsys.readouterr().err == "dfly up: --dir is empty (leave it out for a new temp dir)\n"
    assert not (Path.cwd() / "cluster.json").exists()
    for bad in ("0", "-1", "nan", "abc"):
        with pytest.raises(SystemExit) as info:
            main(["up", "--ready-timeout", bad])
        assert info.value.code == 2
        assert f"'{bad}' is not a positive number of seconds" in capsys.readouterr().err  # abc: `_seconds`
    with pytest.raises(SystemExit) as info:
        main(["up", "--peer", "2"])  # no abbreviation of --peers (argparse's default)
    assert info.value.code == 2
    assert "unrecognized arguments: --peer 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2
