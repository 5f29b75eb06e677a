"""The parts of a local cluster (cluster.py): the configs its processes get, one process's record
(`Member`), and reading a member from outside (log tail, the daemon's stats over its local socket).

Rules: every listener in a generated config is on 127.0.0.1 with port 0 (the real ports come back in
the ready file); each daemon gets its own hostname, storage directory and local socket under the
cluster's directory. Nothing here starts or stops a process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfly.common.errors import DflyError

LOOPBACK = "127.0.0.1"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes including the NUL
DEFAULT_SCHEDULER_CMD: tuple[str, ...] = (sys.executable, "-m", "dfly.cli.dfly", "scheduler")
DEFAULT_DAEMON_CMD: tuple[str, ...] = (sys.executable, "-m", "dfly.cli.dfdaemon")


class ClusterError(DflyError):
    """The local cluster could not be started or a member failed."""

    kind = "cluster"


def scheduler_config(log_level: str = "info") -> dict[str, Any]:
    """The scheduler's YAML config (a `SchedulerConfig` mapping): every listener on 127.0.0.1, port 0."""
    return {
        "listen_ip": LOOPBACK,
        "port": 0,
        "metrics": {"ip": LOOPBACK, "port": 0},
        "log_level": log_level,
    }


def daemon_config(
    name: str,
    base_dir: Path,
    scheduler_addr: str,
    *,
    seed: bool = False,
    upload_limit_bytes_per_s: int = 0,
    log_level: str = "info",
) -> dict[str, Any]:
    """One daemon's YAML config (a `DaemonConfig` mapping): its own hostname, storage and socket."""
    listener = {"ip": LOOPBACK, "port": 0}
    return {
        "host": {"hostname": f"dfly-{name}", "advertise_ip": LOOPBACK},
        "scheduler": {"addrs": [scheduler_addr]},
        "storage": {"dir": str(base_dir / name / "data")},
        "upload": {"rate_limit_bytes_per_s": upload_limit_bytes_per_s},
        "control": {**listener, "trusted_schedulers": [LOOPBACK]},
        "piece": dict(listener),
        "proxy": dict(listener),
        "metrics": dict(listener),
        "health": dict(listener),
        "local_api": {"socket": str(base_dir / name / "dfdaemon.sock")},
        "seed_peer": {"enable": seed, "loopback_origins": True},  # one machine: one loopback
        "log_level": log_level,
    }


@dataclass
class Member:
    """One process of the cluster; `ready` is the content of its ready file once it is ready."""

    name: str
    role: str  # "scheduler" | "seed" | "peer"
    config_path: Path
    ready_path: Path
    log_path: Path
    data_dir: Path
    socket: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def ports(self) -> dict[str, int]:
        ports = self.ready.get("ports", {})
        if not isinstance(ports, dict):
            return {}
        return {str(k): int(v) for k, v in ports.items() if v is not None}  # None: listener not running

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "role": self.role,
            "name": self.name,
            "pid": self.pid,
            "ports": self.ports,
            "data_dir": str(self.ready.get("data_dir", self.data_dir)),
            "log": str(self.log_path),
            "config": str(self.config_path),
        }
        if self.role != "scheduler":
            info["socket"] = str(self.ready.get("socket", self.socket))
            info["proxy_port"] = self.ports.get("proxy")
            info["host_id"] = str(self.ready.get("host_id", ""))
        return info


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ("" if it cannot be read)."""
    try:
        text = path.read_bytes()[-64 * 1024 :].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def dfget_command() -> list[str]:
    """How to run dfget as a child: the installed script next to this interpreter, else `-m`."""
    script = Path(sys.executable).parent / "dfget"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dfly.cli.dfget"]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def query_stats(socket_path: str | Path, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask a daemon for its counters: one JSON line `{"op": "stats"}`, one JSON line back.

    The reply is `{"event": "stats", "stats": {...}}` (a bare counters object is accepted too); the
    counters hold at least `download_bytes` {back_to_source, remote_seed, remote_peer, local_peer},
    `upload_bytes` and `tasks`.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(socket_path))
        sock.sendall(b'{"op": "stats"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf.split(b"\n", 1)[0] or b"null")
    if isinstance(reply, dict) and reply.get("event") == "stats" and isinstance(reply.get("stats"), dict):
        stats: dict[str, Any] = reply["stats"]
        return stats
    if not isinstance(reply, dict) or "event" in reply:
        raise ClusterError(f"daemon at {socket_path} answered stats with {reply!r}")
    return reply
