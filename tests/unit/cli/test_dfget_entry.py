"""The `dfget` console script: a Ctrl-C at any instant gives one line and 130, never a traceback."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

# The signal arrives while dfget's modules are still being imported (the entry module is loaded first).
DURING_IMPORT = """
import os, signal
import dfly.cli.dfget_main
os.kill(os.getpid(), signal.SIGINT)
import dfly.cli.dfget
"""

# After the entry point loaded dfget, Python's own handler is back: dfget turns it into its clean-up.
DURING_ARGUMENTS = """
import os, signal, sys
import dfly.cli.dfget_main as entry
import dfly.cli.dfget as dfget
real = dfget.parse_args
def interrupted(argv):
    os.kill(os.getpid(), signal.SIGINT)
    return real(argv)
dfget.parse_args = interrupted
sys.argv = ["dfget", "http://h/x", "-O", "/tmp/never-written"]
raise SystemExit(entry.main())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_ctrl_c_while_importing_is_one_line_and_130() -> None:
    result = run(DURING_IMPORT)
    assert result.returncode == 130
    assert result.stderr == "dfget: interrupted\n"


def test_ctrl_c_while_parsing_arguments_is_one_line_and_130() -> None:
    result = run(DURING_ARGUMENTS)
    assert result.returncode == 130
    assert result.stderr == "dfget: interrupted\n"


def test_the_console_script_is_the_entry_module() -> None:
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="dfget")
    assert script.value == "dfly.cli.dfget_main:main"
