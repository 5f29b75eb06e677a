"""dfget stays light: importing it (and running --version) pulls in no heavy third-party module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# _hashlib loads libcrypto: ~13 ms of a 36 ms start-up, and dfget hashes only with --digest.
HEAVY = ("pydantic", "grpc", "google.protobuf", "rich", "yaml", "prometheus_client", "asyncio", "_hashlib")

PROBE = """
import json, sys
import dfly.cli.dfget as m
if len(sys.argv) > 1:
    try:
        m.main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("argv", [[], ["--version"], ["http://h/x", "-O", "/nonexistent-dir/x"]])
def test_no_heavy_imports(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60, check=True
    )
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == []


def test_progress_without_a_terminal_does_not_import_rich() -> None:
    code = (
        "import sys; from dfly.cli._dfget_progress import make_progress, NoProgress;"
        "assert isinstance(make_progress(True), NoProgress); assert 'rich' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, check=True)
