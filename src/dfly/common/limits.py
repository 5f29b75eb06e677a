"""Process limits a dfly server raises at start.

Rules: the open-files soft limit goes up to the hard limit, as Go's runtime does for Dragonfly's own
servers. A daemon holds a socket per child, parent and proxy client, and task files besides: far more
than the common default soft limit of 1,024, past which every accept, download and task file fails with
EMFILE. The limit is never lowered; a limit that cannot be raised is reported, never fatal. What a
config may need at once is compared with the result, so a hard limit too low for it is said at start,
not discovered under load.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def check_open_files_limit(needed: int, what: str) -> int:
    """Raise the limit and log the outcome; warn when it stays under `needed` (described by `what`)."""
    before, now = raise_open_files_limit()
    if now > before:
        log.info("open files limit raised from %d to %d (the hard limit)", before, now)
    if now != resource.RLIM_INFINITY and now < needed:
        log.warning(
            "the open files limit is %d but this config may hold %d descriptors at once (%s); past the "
            "limit connections and task files fail: raise the hard limit (systemd LimitNOFILE=, ulimit -Hn)",
            now,
            needed,
            what,
        )
    return now
