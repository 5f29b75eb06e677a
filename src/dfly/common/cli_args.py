"""The command-line tools' argument parser: bad usage is one line on stderr and exit 2, as every other
error of the tools (docs/cli.md), instead of argparse's usage block followed by the error."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors are `PROG: MESSAGE (see PROG --help)`, exit 2; its
    sub-command parsers are of the same kind. A long option is taken only when spelled out: argparse's
    abbreviations read Dragonfly's `--filter` as `--filtered-query-param`, quietly wrong."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)
