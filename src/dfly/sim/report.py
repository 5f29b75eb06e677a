"""Figures of a run: percentiles (linear interpolation, as bench/swarm.py), ratios to the per-host bound,
origin copies, simulator and scheduler costs; and the calibration record that marks figures as
`calibrated` only while the code that produced the calibration is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfly.sim.swarm import SwarmResult

CALIBRATION_TOLERANCE = 0.15  # simulated p95/T_min within ±15 % of the measured one


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float, digits: int = 4) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def summarize(result: SwarmResult, *, calibrated: bool = False) -> dict[str, Any]:
    c = result.config
    bound = c.bound_s()
    times = result.host_times
    p = {name: percentile(times, q) for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("p999", 99.9))}
    worst = max(times) if times else math.nan
    events = result.scheduler_events
    return {
        "hosts": c.hosts,
        "file_bytes": c.file_bytes,
        "layers": c.layers,
        "piece_length": result.piece_length,
        "host_rate_bytes_per_s": round(c.host_up),
        "seed_rate_bytes_per_s": round(c.seed_up),
        "origin_rate_bytes_per_s": round(c.origin),
        "candidate_parents": c.engine.candidate_parent_limit,
        "max_parents": c.daemon.max_parents,
        "topology": c.engine.topology,
        "first_pass_hold_s": c.daemon.first_pass_hold_s if c.daemon.first_pass else None,
        "churn": c.churn,
        "seed": c.seed,
        "bound_s": _round(bound),
        "p50_s": _round(p["p50"]),
        "p95_s": _round(p["p95"]),
        "p99_s": _round(p["p99"]),
        "p999_s": _round(p["p999"]),
        "max_s": _round(worst),
        "p50_over_bound": _round(p["p50"] / bound),
        "p95_over_bound": _round(p["p95"] / bound),
        "p99_over_bound": _round(p["p99"] / bound),
        "p999_over_bound": _round(p["p999"] / bound),
        "max_over_bound": _round(worst / bound),
        "origin_copies": round(result.origin_bytes / c.file_bytes, 4),
        "seed_upload_copies": round(result.seed_upload_bytes / c.file_bytes, 4),
        "completed": len(times),
        "left": result.left,
        "failed": result.failed,
        "sim_s": round(result.sim_s, 4),
        "sim_wall_s": round(result.wall_s, 3),
        "events": result.events,
        "scheduler_events": events,
        "scheduler_cpu_s": round(result.scheduler_cpu_s, 4),
        "scheduler_cpu_us_per_event": round(1e6 * result.scheduler_cpu_s / events, 2) if events else None,
        "scheduler_cpu_s_per_sim_s": round(result.scheduler_cpu_s / result.sim_s, 6)
        if result.sim_s
        else None,
        "engine_errors": result.engine_errors,
        "calibrated": calibrated,
    }


# --- calibration record ---------------------------------------------------------------------------------

_MODEL_SOURCES = ("scheduler/core", "daemon/core", "sim")


def code_digest() -> str:
    """sha256 over the sources the figures depend on (scheduler core, daemon cores, configs, piece rule,
    sim)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in _MODEL_SOURCES:
        for path in sorted((root / folder).glob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    for name in ("daemon/config.py", "scheduler/core/config.py", "common/pieces.py"):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def calibration_valid(path: Path) -> bool:
    """True when the record at `path` passed and was made with the code as it is now."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(record.get("calibrated")) and record.get("code_digest") == code_digest()
