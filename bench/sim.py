"""Benchmark: sweeps of the swarm simulator (`dfly sim`), one JSON line per run on stdout.

    bench/sim.py --hosts 300 --file-mb 3000 --layers 2 --host-rate-mbyte 300 \\
        --vary piece-length=1MiB,4MiB,16MiB --vary candidate-parents=3,8,12 --vary topology=mesh,dag \\
        --vary churn=0,0.1 [--seeds 2]

Every flag but `--vary` and `--seeds` is `dfly sim`'s (the base scenario). Each `--vary NAME=V1,V2,...`
runs the base scenario with that one flag changed to each value in turn (one factor at a time), for each
of `--seeds` seeds; every line carries `vary` (the flag and value) and `seed`. The base scenario itself
is run once per seed first (`vary: "base"`). Exit 2 on bad input, 1 if any run had a host that did not
complete (its line is still printed, with `failed` > 0).
"""

from __future__ import annotations

import argparse
import json
import sys

from dfly.common.errors import UsageError
from dfly.devtools.argtypes import positive_int
from dfly.sim.cli import build_config, parser
from dfly.sim.report import summarize
from dfly.sim.swarm import run_swarm


def _variations(pairs: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [("base", "")]
    for pair in pairs:
        name, sep, values = pair.partition("=")
        if not sep or not name or not values:
            raise UsageError(f"--vary needs NAME=V1,V2,..., got {pair!r}")
        out.extend((name.strip(), value.strip()) for value in values.split(","))
    return out


def main(argv: list[str]) -> int:
    outer = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --seed is not --seeds
    outer.add_argument("--vary", action="append", default=[])
    outer.add_argument("--seeds", type=positive_int, default=1)
    ours, rest = outer.parse_known_args(argv)
    sim = parser()
    sim.prog = "bench/sim.py"
    sweep = sim.add_argument_group("sweep (bench/sim.py only)")  # listed by --help; split off above
    sweep.add_argument(
        "--vary",
        action="append",
        metavar="NAME=V1,V2,...",
        help="run the base scenario with flag NAME at each value in turn (repeatable)",
    )
    sweep.add_argument("--seeds", type=positive_int, default=1, metavar="K", help="seeds per run (default 1)")
    base = sim.parse_args(rest)
    code = 0
    for name, value in _variations(ours.vary):
        args = base if name == "base" else sim.parse_args([*rest, f"--{name}", value])
        for seed in range(base.seed, base.seed + ours.seeds):
            result = run_swarm(build_config(args, seed=seed))
            out = summarize(result)
            out["vary"] = "base" if name == "base" else f"{name}={value}"
            out["fairness"] = args.fairness
            print(json.dumps(out), flush=True)
            if result.failed or result.engine_errors:
                code = 1
    return code


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UsageError as exc:
        print(f"bench/sim.py: {exc}", file=sys.stderr)
        sys.exit(2)
