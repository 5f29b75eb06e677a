"""Process logging setup: one line per record on stderr, with the component name."""

from __future__ import annotations

import logging


def setup_logging(component: str, level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s",
    )
