"""Bad usage of any tool is one line on stderr naming the tool and the problem, exit 2 (docs/cli.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dfly.common.cli_args import OneLineParser


def test_a_usage_error_is_one_line_with_a_pointer_to_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = OneLineParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("--count", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["run", "--count", "x"])
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == "tool run: argument --count: invalid int value: 'x' (see tool run --help)\n"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dfly.cli.dfget", "http://x/"], "dfget: the following arguments are required: -O/--output"),
        (["dfly.cli.dfdaemon", "--bogus"], "dfdaemon: unrecognized arguments: --bogus"),
        (["dfly.cli.dfly", "up", "--peers", "abc"], "dfly up: argument --peers: invalid int value: 'abc'"),
        (
            ["dfly.cli.dfly", "scheduler", "--port", "abc"],
            "dfly scheduler: argument --port: invalid int value",
        ),
    ],
)
def test_every_tool_says_bad_usage_in_one_line(argv: list[str], expected: str) -> None:
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(expected), done.stderr


def test_dfget_help_names_its_real_fallback_socket_whatever_the_environment() -> None:
    env = {"DFGET_ENDPOINT": "/tmp/elsewhere.sock", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "dfly.cli.dfget", "--help"], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert " ".join(done.stdout.split()).count("default $DFGET_ENDPOINT, else /run/dfly/dfdaemon.sock") == 1
