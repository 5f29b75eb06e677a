"""The `--ready-file` of dfdaemon and `dfly scheduler`: JSON with the bound ports, written once serving.

Rules: the path is checked at start (`check_ready_file`, a usage error, exit 2), so a file that could
never be written does not fail a server that already serves; the file appears whole (written to a
temporary name beside it, then renamed), so a reader polling for it never reads half of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dfly.common.errors import DflyError, UsageError


def check_ready_file(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"--ready-file {path} is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--ready-file {path}: directory {path.parent} does not exist")


def write_ready_file(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(payload))
        os.replace(temporary, path)
    except OSError as exc:
        raise DflyError(f"cannot write ready file {path}: {exc.strerror or exc}") from None
