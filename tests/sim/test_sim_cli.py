"""`dfly sim`: the JSON line, and one clear line with exit 2 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfly.cli.dfly import main
from dfly.sim.cli import CALIBRATION_ENV
from dfly.sim.report import code_digest

SMALL = ["sim", "--hosts", "4", "--file-mib", "4", "--host-rate-mbit", "100"]
REQUIRED_KEYS = {
    "hosts", "file_bytes", "layers", "bound_s", "p50_s", "p95_s", "p99_s", "p999_s", "max_s",
    "p99_over_bound", "p999_over_bound", "origin_copies", "sim_wall_s", "events", "scheduler_cpu_s",
    "scheduler_cpu_us_per_event", "scheduler_cpu_s_per_sim_s", "calibrated",
}  # fmt: skip


def test_json_line_has_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL, "--json", "--layers", "2", "--churn", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out.keys() >= REQUIRED_KEYS
    assert out["hosts"] == 4
    assert out["layers"] == 2
    assert out["calibrated"] is False
    assert out["origin_copies"] == pytest.approx(1.0, abs=0.01)
    # 4 MiB at 100 Mbit/s wire = 11.96 MB/s payload: F/R bounds every host.
    assert out["bound_s"] == pytest.approx(4 * 2**20 / (100e6 / 8 * 1448 / 1514), rel=1e-3)
    assert out["p50_s"] >= out["bound_s"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--hosts", "0"],
        ["--hosts", "x"],
        ["--churn", "1.5"],
        ["--piece-length", "3MiB"],
        ["--piece-length", "lots"],
        ["--candidate-parents", "0"],
        ["--layers", "0"],
        ["--file-mib", "-1"],
        ["--topology", "ring"],
        ["--latency-ms", "-1"],
        ["--no-such-flag"],
        ["--host-rate-mbyte", "5"],  # both rate flags
        ["--file-mib", "nan"],
        ["--latency-ms", "nan"],  # was taken as 0
        ["--calibration", "/nonexistent/calibration.json"],  # was silently "calibrated: false"
        ["--hosts", "100001"],  # 10^8 hosts grew memory without end
        ["--layers", "1001"],  # 100,000 layers: 4.5 GB of memory after a minute
        ["--hosts", "1000", "--layers", "1000"],
        ["--hosts", "10000", "--file-mib", "100000"],  # 62.5 M piece downloads: many hours
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    assert main([*SMALL, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dfly sim: ")


def test_missing_rate_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--hosts", "4", "--file-mib", "4"]) == 2
    assert "--host-rate-mbit" in capsys.readouterr().err


def test_calibrate_needs_a_measured_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--calibrate"]) == 2
    assert "--measured-16" in capsys.readouterr().err
    assert main(["sim", "--calibrate", "--measured-8", "-1"]) == 2


def test_no_traceback_and_same_output_under_other_hash_seeds() -> None:
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-m", "dfly.cli.dfly", *SMALL, "--hosts", "10", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        for key in (
            "sim_wall_s",
            "scheduler_cpu_s",
            "scheduler_cpu_us_per_event",
            "scheduler_cpu_s_per_sim_s",
        ):
            out.pop(key)
        outputs.append(out)
    assert outputs[0] == outputs[1]
    bad = subprocess.run(
        [sys.executable, "-m", "dfly.cli.dfly", "sim", "--hosts", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_calibrated_only_with_a_passing_record_of_this_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, stale = tmp_path / "good.json", tmp_path / "stale.json"
    good.write_text(json.dumps({"calibrated": True, "code_digest": code_digest()}))
    stale.write_text(json.dumps({"calibrated": True, "code_digest": "0" * 64}))
    for record, expected in ((good, True), (stale, False)):
        assert main([*SMALL, "--json", "--calibration", str(record)]) == 0
        assert json.loads(capsys.readouterr().out)["calibrated"] is expected
    # a record named by the environment (CI, shared shells) may be absent: then uncalibrated, no error
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CALIBRATION_ENV, str(tmp_path / "missing.json"))
        assert main([*SMALL, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["calibrated"] is False


def test_calibrate_prints_simulated_next_to_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "calibration.json"
    argv = ["sim", "--calibrate", "--measured-8", "1.35", "--runs", "1", "--json"]
    assert main([*argv, "--save-calibration", str(record)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_8"] == 1.35
    assert out["sim_8"] >= 1.0  # no host beats T_min
    assert out["sim_16"] >= 1.0
    assert out["calibrated"] is False  # the 16-host figure was not given
    assert json.loads(record.read_text())["code_digest"] == code_digest()
