"""A stand-in for the scheduler or dfdaemon, driven by the launcher tests.

argv: MODE [--config F] [--seed] [--ready-file P]; MODE is ok | exit-early | never-ready | ignore-term.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import yaml


def main() -> int:
    mode, rest = sys.argv[1], sys.argv[2:]
    with open(rest[rest.index("--config") + 1]) as f:
        config = yaml.safe_load(f)
    ready = rest[rest.index("--ready-file") + 1]
    print(f"fake member {mode} argv={rest}", flush=True)
    if mode == "exit-early":
        print("fatal: cannot bind the control port", file=sys.stderr, flush=True)
        return 3
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode != "never-ready":
        seed = "--seed" in rest
        if "local_api" in config:
            ports = {"control": 1, "proxy": 2, "metrics": 3, "health": 4, "piece": 5}
            info = {
                "role": "seed" if seed else "peer",
                "pid": os.getpid(),
                "host_id": f"127.0.0.1-{config['host']['hostname']}",
                "hostname": config["host"]["hostname"],
                "data_dir": config["storage"]["dir"],
                "socket": config["local_api"]["socket"],
                "ports": {**ports, "proxy": None},
            }
        else:
            info = {"role": "scheduler", "pid": os.getpid(), "ports": {"grpc": 9, "metrics": 8}}
        with open(ready + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(ready + ".tmp", ready)
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
