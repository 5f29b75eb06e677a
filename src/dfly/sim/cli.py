"""`dfly sim`: run one simulated swarm (one JSON line with --json), or `--calibrate` against measured
netns figures. Bad input is one line on stderr and exit 2; a run where a host still present did not
complete, or the engine raised, exits 1 (its figures are still printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from dfly.common.errors import UsageError
from dfly.common.pieces import default_piece_length, parse_size, piece_count, validate_user_piece_length
from dfly.scheduler.core.config import EngineConfig
from dfly.sim.model import DaemonSettings
from dfly.sim.report import CALIBRATION_TOLERANCE, calibration_valid, code_digest, percentile, summarize
from dfly.sim.swarm import TCP_PAYLOAD_FACTOR, SwarmConfig, run_swarm

CALIBRATION_ENV = "DFLY_SIM_CALIBRATION"
MIB = 1 << 20
# The two netns cases of issue 3: (hosts, file MiB, host/seed/origin rate Mbit/s).
CALIBRATION_CASES = {"8": (8, 64, 100.0), "16": (16, 64, 50.0)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        allow_abbrev=False,  # as the other tools (common/cli_args.py)
        prog="dfly sim",
        description="Flow-level swarm simulation driving the real scheduler engine and download planner. "
        "Rates are wire rates; the model runs at TCP payload rate (x --wire-efficiency).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--file-mib", type=finite, help="total size to distribute, MiB (2^20 bytes)")
    size.add_argument("--file-mb", type=finite, help="total size to distribute, MB (10^6 bytes)")
    p.add_argument("--hosts", type=int, help="downloading hosts (the seed host comes on top)")
    p.add_argument("--layers", type=int, default=1, help="files (tasks) the size is split into (default 1)")
    for name, what in (("host", "every host, up and down"), ("seed", "the seed host"), ("origin", "origin")):
        group = p.add_mutually_exclusive_group()
        default = "" if name == "host" else f" (default: the {'host' if name == 'seed' else 'seed'} rate)"
        group.add_argument(f"--{name}-rate-mbit", type=finite, help=f"{what}: Mbit/s{default}")
        group.add_argument(f"--{name}-rate-mbyte", type=finite, help=f"{what}: MB/s (10^6 bytes){default}")
    p.add_argument("--piece-length", help="user-fixed piece length, e.g. 4MiB (default: the daemon's rule)")
    p.add_argument(
        "--candidate-parents",
        type=int,
        help="scheduler candidate_parent_limit and daemon max_parents (default: their configs' defaults)",
    )
    p.add_argument("--max-parents", type=int, help="daemon download.max_parents alone")
    p.add_argument("--filter-parents", type=int, help="scheduler filter_parent_limit (candidates sampled)")
    p.add_argument("--requests-per-parent", type=int, help="daemon download.requests_per_parent")
    p.add_argument("--topology", choices=["mesh", "dag"], help="scheduler topology (default: its config's)")
    p.add_argument("--churn", type=finite, default=0.0, help="fraction of hosts leaving mid-download")
    p.add_argument("--latency-ms", type=finite, default=0.1, help="one-way delay host-host/origin (0.1)")
    p.add_argument("--scheduler-latency-ms", type=finite, help="one-way delay host-scheduler (= latency)")
    p.add_argument("--idcs", type=int, default=1, help="IDC labels hosts are spread over (default 1)")
    p.add_argument("--idc-latency-ms", type=finite, default=0.0, help="extra one-way delay across IDCs")
    p.add_argument("--start-spread-s", type=finite, default=0.0, help="hosts start uniformly within this")
    p.add_argument(
        "--fairness",
        choices=["equal", "maxmin"],
        default="equal",
        help="link sharing: equal share per endpoint (default: matches the netns figures) or local max-min",
    )
    p.add_argument(
        "--no-first-pass",
        action="store_true",
        help="the origin reader serves any piece to anyone (upload.first_pass: false)",
    )
    p.add_argument(
        "--first-pass-hold-s",
        type=finite,
        help="seconds from the last piece given out to the first pass's release (upload.first_pass_hold_s)",
    )
    p.add_argument(
        "--announce-upload-limit",
        action="store_true",
        help="daemons announce their uplink as upload limit (default 0 = unlimited)",
    )
    p.add_argument(
        "--wire-efficiency",
        type=finite,
        default=TCP_PAYLOAD_FACTOR,
        help="payload bytes per wire byte (default 1448/1514)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")
    p.add_argument(
        "--max-sim-s", type=finite, default=0.0, help="virtual-time limit (default 50 x bound + 120)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--calibration", type=Path, help=f"calibration record to honour (or ${CALIBRATION_ENV})")
    cal = p.add_argument_group("calibration (--calibrate)")
    cal.add_argument("--calibrate", action="store_true", help="run the 8- and 16-host netns cases")
    cal.add_argument("--measured-8", type=finite, help="measured p95/T_min, 8 hosts x 64 MiB x 100 Mbit/s")
    cal.add_argument("--measured-16", type=finite, help="measured p95/T_min, 16 hosts x 64 MiB x 50 Mbit/s")
    cal.add_argument("--runs", type=int, default=3, help="seeds per calibration case (median taken)")
    cal.add_argument("--save-calibration", type=Path, help="write the calibration record here")
    return p


def finite(text: str) -> float:
    """A float flag: nan and inf are no sizes, rates or delays (argparse turns the error into exit 2)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _rate(args: argparse.Namespace, name: str, fallback: float | None) -> float:
    mbit, mbyte = getattr(args, f"{name}_rate_mbit"), getattr(args, f"{name}_rate_mbyte")
    if mbit is not None:
        wire = mbit * 1e6 / 8
    elif mbyte is not None:
        wire = mbyte * 1e6
    elif fallback is not None:
        return fallback
    else:
        raise UsageError(f"--{name}-rate-mbit or --{name}-rate-mbyte is required")
    if not wire > 0:
        raise UsageError(f"--{name}-rate must be > 0")
    return float(wire * args.wire_efficiency)


# Bounds that keep a run within this machine's memory and an hour (10,000 hosts x 2 layers: ~1 GiB).
MAX_HOSTS = 100_000
MAX_LAYERS = 1_000
MAX_PEERS = 200_000
MAX_PIECE_DOWNLOADS = 10_000_000  # Kraken's case at 10,000 hosts is 7.2 M (~30 min)


def _positive(value: int | float | None, flag: str, *, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def build_config(args: argparse.Namespace, *, seed: int | None = None) -> SwarmConfig:
    if args.hosts is None or (args.file_mib is None and args.file_mb is None):
        raise UsageError("--hosts and --file-mib (or --file-mb) are required")
    _positive(args.hosts, "--hosts")
    _positive(args.file_mib if args.file_mib is not None else args.file_mb, "--file-mib/--file-mb")
    _positive(args.layers, "--layers")
    if args.hosts > MAX_HOSTS:
        raise UsageError(f"--hosts is at most {MAX_HOSTS:,}, got {args.hosts:,}")
    if args.layers > MAX_LAYERS:
        raise UsageError(f"--layers is at most {MAX_LAYERS:,}, got {args.layers:,}")
    if args.hosts * args.layers > MAX_PEERS:
        raise UsageError(
            f"--hosts x --layers is at most {MAX_PEERS:,} downloads, got {args.hosts * args.layers:,}"
        )
    for flag in ("latency_ms", "idc_latency_ms", "start_spread_s", "max_sim_s", "scheduler_latency_ms"):
        _positive(getattr(args, flag), f"--{flag.replace('_', '-')}", allow_zero=True)
    if not 0 < args.wire_efficiency <= 1:
        raise UsageError(f"--wire-efficiency must be in (0, 1], got {args.wire_efficiency:g}")
    if not 0 <= args.churn < 1:
        raise UsageError(f"--churn must be in [0, 1), got {args.churn:g}")
    _positive(args.idcs, "--idcs")
    file_bytes = round(args.file_mib * MIB if args.file_mib is not None else args.file_mb * 1e6)
    if file_bytes < args.layers:
        raise UsageError("the file must have at least one byte per layer")
    piece_length = 0
    if args.piece_length is not None:
        piece_length = validate_user_piece_length(parse_size(args.piece_length))
    layer_bytes = file_bytes // args.layers
    pieces = args.layers * piece_count(layer_bytes, piece_length or default_piece_length(layer_bytes))
    if args.hosts * pieces > MAX_PIECE_DOWNLOADS:
        raise UsageError(
            f"{args.hosts:,} hosts x {pieces:,} pieces each is more than {MAX_PIECE_DOWNLOADS:,} piece "
            "downloads (about an hour here): use fewer hosts, a smaller file or a larger --piece-length"
        )
    host = _rate(args, "host", None)
    seed_rate = _rate(args, "seed", host)
    origin = _rate(args, "origin", seed_rate)
    engine_fields: dict[str, Any] = {}
    daemon_fields: dict[str, Any] = {"announce_upload_limit": args.announce_upload_limit}
    if args.no_first_pass:
        daemon_fields["first_pass"] = False
    if args.first_pass_hold_s is not None:
        if args.first_pass_hold_s < 0:
            raise UsageError("--first-pass-hold-s must be >= 0")
        daemon_fields["first_pass_hold_s"] = args.first_pass_hold_s
    if args.candidate_parents is not None:
        engine_fields["candidate_parent_limit"] = args.candidate_parents
        daemon_fields["max_parents"] = args.candidate_parents
    if args.max_parents is not None:
        daemon_fields["max_parents"] = args.max_parents
    if args.filter_parents is not None:
        engine_fields["filter_parent_limit"] = args.filter_parents
    if args.requests_per_parent is not None:
        _positive(args.requests_per_parent, "--requests-per-parent")
        daemon_fields["requests_per_parent"] = args.requests_per_parent
    if args.topology is not None:
        engine_fields["topology"] = args.topology
    _positive(daemon_fields.get("max_parents"), "--max-parents")
    try:
        engine = EngineConfig(**engine_fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise UsageError(f"scheduler {error['loc'][0]}: {error['msg']}") from None
    latency = args.latency_ms / 1000
    scheduler_latency = latency if args.scheduler_latency_ms is None else args.scheduler_latency_ms / 1000
    return SwarmConfig(
        hosts=args.hosts,
        file_bytes=file_bytes,
        host_up=host,
        host_down=host,
        seed_up=seed_rate,
        seed_down=seed_rate,
        origin=origin,
        layers=args.layers,
        piece_length=piece_length,
        engine=engine,
        daemon=DaemonSettings(**daemon_fields),
        churn=args.churn,
        latency_s=latency,
        scheduler_latency_s=scheduler_latency,
        idcs=args.idcs,
        idc_latency_s=args.idc_latency_ms / 1000,
        start_spread_s=args.start_spread_s,
        fairness=args.fairness,
        seed=args.seed if seed is None else seed,
        max_sim_s=args.max_sim_s,
    )


def _calibrate(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Both netns cases; `calibrated` only when both measured figures are given and both are met."""
    if args.measured_8 is None and args.measured_16 is None:
        raise UsageError("--calibrate needs --measured-8 and/or --measured-16 (measured p95/T_min)")
    _positive(args.runs, "--runs")
    out: dict[str, Any] = {"mode": "calibrate", "tolerance": CALIBRATION_TOLERANCE}
    passed = args.measured_8 is not None and args.measured_16 is not None
    for key, (hosts, mib, mbit) in CALIBRATION_CASES.items():
        measured = getattr(args, f"measured_{key}")
        _positive(measured, f"--measured-{key}")
        case = argparse.Namespace(**vars(args))
        case.hosts, case.file_mib, case.file_mb, case.host_rate_mbit = hosts, mib, None, mbit
        case.host_rate_mbyte = case.seed_rate_mbit = case.seed_rate_mbyte = None
        case.origin_rate_mbit = case.origin_rate_mbyte = None
        ratios, seed_copies = [], []
        for run in range(args.runs):
            result = run_swarm(build_config(case, seed=args.seed + run))
            ratios.append(percentile(result.host_times, 95) / result.config.bound_s())
            seed_copies.append(result.seed_upload_bytes / result.config.file_bytes)
            out["piece_length"] = result.piece_length
        simulated = statistics.median(ratios)
        out[f"sim_{key}"] = round(simulated, 3)
        out[f"sim_{key}_runs"] = [round(r, 3) for r in ratios]
        out[f"sim_{key}_seed_copies"] = round(statistics.median(seed_copies), 3)
        out[f"measured_{key}"] = measured
        if measured is not None:
            within = abs(simulated - measured) <= CALIBRATION_TOLERANCE * measured
            out[f"within_{key}"] = within
            passed = passed and within
    out["fairness"] = args.fairness
    out["calibrated"] = passed
    out["code_digest"] = code_digest()
    if args.save_calibration is not None:
        try:
            args.save_calibration.write_text(json.dumps(out, indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {args.save_calibration}: {exc.strerror or exc}") from None
    return out, 0


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    if args.calibrate:
        out, code = _calibrate(args)
    else:
        config = build_config(args)
        record = args.calibration or (
            Path(os.environ[CALIBRATION_ENV]) if CALIBRATION_ENV in os.environ else None
        )
        if (
            args.calibration is not None and not args.calibration.is_file()
        ):  # a typo: not silently uncalibrated
            raise UsageError(f"calibration record {args.calibration} does not exist")
        result = run_swarm(config)
        out = summarize(result, calibrated=record is not None and calibration_valid(record))
        code = 1 if result.failed or result.engine_errors else 0
        if result.failures:
            out["failures"] = result.failures
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        for key, value in out.items():
            print(f"{key:>28}  {value}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"dfly sim: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dfly sim: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug in the model must still end with one line, not a traceback
        print(f"dfly sim: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
