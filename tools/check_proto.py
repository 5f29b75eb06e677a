"""CI check: the generated code under src/dfly/api is current with its .proto files.

Regenerates into a temporary directory and compares byte for byte; exits 1 naming stale files.
"""

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "src" / "dfly" / "api"
PROTOS = ["dfly/api/scheduler.proto", "dfly/api/daemon.proto"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I.",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"--mypy_out={out}",
                f"--mypy_grpc_out={out}",
                *PROTOS,
            ],
            cwd=ROOT / "src",
            check=True,
            capture_output=True,
            env=env,
        )
        stale = [
            p.name
            for p in sorted((out / "dfly" / "api").iterdir())
            if not (API / p.name).exists() or not filecmp.cmp(p, API / p.name, shallow=False)
        ]
    if stale:
        print(f"generated code is stale, run `make proto`: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
