"""All-in-one local cluster: a scheduler, a seed peer and N peers on 127.0.0.1 as separate processes.

This is the library behind `dfly up`, the demo, the benchmarks and the integration tests. The configs
its processes get, the `Member` record and the stats query live in cluster_members.py.

Rules it keeps:
- Children are started with exec (`subprocess.Popen`, never a bare fork), each in its own process
  group so that a terminal's Ctrl-C reaches only the launcher, which then stops them in order.
- Every listener in a generated config has port 0; the real ports come back in each process's ready
  file. The scheduler starts first and its real gRPC port goes into the daemons' `scheduler.addrs`.
- Waiting is bounded: a child that exits early or never writes its ready file fails the start with the
  last lines of its log (`DIR/<name>.log`, stdout and stderr together).
- Stopping: SIGTERM to the daemons, then the scheduler, a bounded wait, then SIGKILL. Nothing under DIR
  is removed; `cluster.json` (temp file + rename) describes the running cluster.
- One cluster per DIR: `DIR/.lock` is held (flock) from start to stop, so a second `dfly up --dir DIR`
  fails before it writes anything instead of overwriting a running cluster's configs and ready files.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from dfly.cluster_members import (
    DEFAULT_DAEMON_CMD,
    DEFAULT_SCHEDULER_CMD,
    LOOPBACK,
    SOCKET_PATH_MAX,
    ClusterError,
    Member,
    daemon_config,
    dfget_command,
    query_stats,
    scheduler_config,
    tail,
    write_json_atomic,
)

__all__ = [  # the parts are importable from here too, as before they moved
    "DEFAULT_DAEMON_CMD", "DEFAULT_SCHEDULER_CMD", "LOOPBACK", "ClusterError", "LocalCluster", "Member",
    "daemon_config", "dfget_command", "query_stats", "scheduler_config",
]  # fmt: skip


class LocalCluster:
    """Scheduler + seed + N peers; a context manager (sync) and an async context manager.

    `start()` returns once every member has written its ready file and `cluster.json` is written;
    `stop()` stops them all (idempotent). Members: `scheduler` (the first of `schedulers`), `seed`, `peers`,
    `members`, `member(name)`.
    """

    def __init__(
        self,
        base_dir: str | Path | None = None,
        *,
        peers: int = 3,
        seed_upload_limit_bytes_per_s: int = 0,
        log_level: str = "info",
        ready_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        scheduler_cmd: Sequence[str] = DEFAULT_SCHEDULER_CMD,
        daemon_cmd: Sequence[str] = DEFAULT_DAEMON_CMD,
        daemon_overrides: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
        schedulers: int = 1,
        scheduler_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if peers < 0:
            raise ClusterError("the number of peers must be >= 0")
        if schedulers < 1:
            raise ClusterError("the number of schedulers must be >= 1")
        self.n_schedulers = schedulers
        self.scheduler_overrides = dict(scheduler_overrides or {})  # top-level keys of its config
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="dfly-up-"))
        self.n_peers = peers
        self.seed_upload_limit_bytes_per_s = seed_upload_limit_bytes_per_s
        self.log_level = log_level
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.scheduler_cmd = list(scheduler_cmd)
        self.daemon_cmd = list(daemon_cmd)
        # Per daemon name ("seed", "peer-1", …, or "*" for every daemon, applied first): config sections
        # whose keys replace the defaults.
        self.daemon_overrides = {name: dict(sections) for name, sections in (daemon_overrides or {}).items()}
        self.members: list[Member] = []
        self.cluster_json = self.base_dir / "cluster.json"
        self._lock_fd: int | None = None

    # -- access -----------------------------------------------------------------------------------
    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def scheduler(self) -> Member:
        return self.member("scheduler")

    @property
    def seed(self) -> Member:
        return self.member("seed")

    @property
    def peers(self) -> list[Member]:
        return [m for m in self.members if m.role == "peer"]

    @property
    def daemons(self) -> list[Member]:
        return [m for m in self.members if m.role != "scheduler"]

    @property
    def scheduler_addr(self) -> str:
        return f"{LOOPBACK}:{self.scheduler.ports['grpc']}"

    @property
    def schedulers(self) -> list[Member]:
        return [m for m in self.members if m.role == "scheduler"]

    @property
    def scheduler_addrs(self) -> list[str]:
        """Every scheduler's address, in start order (the daemons' `scheduler.addrs`)."""
        return [f"{LOOPBACK}:{m.ports['grpc']}" for m in self.schedulers]

    def describe(self) -> dict[str, Any]:
        scheduler = self.scheduler_addr if self.members and self.scheduler.ready else ""
        return {
            "dir": str(self.base_dir),
            "scheduler_addr": scheduler,
            "processes": [m.describe() for m in self.members],
        }

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every member, in order, each once the previous is ready; stop all on failure."""
        try:
            self.base_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ClusterError(f"cluster dir {self.base_dir} is not a directory") from None
        self._lock()
        try:
            sched_names = ["scheduler"] + [f"scheduler-{i}" for i in range(2, self.n_schedulers + 1)]
            sched_config = {**scheduler_config(self.log_level), **self.scheduler_overrides}
            scheds = [self._launch(n, "scheduler", dict(sched_config)) for n in sched_names]
            self._wait_ready(scheds)
            for sched in scheds:
                if "grpc" not in sched.ports:
                    raise ClusterError(f"scheduler ready file {sched.ready_path} has no ports.grpc")
            names = [("seed", "seed")] + [(f"peer-{i}", "peer") for i in range(1, self.n_peers + 1)]
            daemons = [self._launch_daemon(name, role) for name, role in names]
            self._wait_ready(daemons)
            write_json_atomic(self.cluster_json, self.describe())
        except BaseException:
            self.stop()
            raise

    def _launch_daemon(self, name: str, role: str) -> Member:
        seed = role == "seed"
        limit = self.seed_upload_limit_bytes_per_s if seed else 0
        cfg = daemon_config(
            name,
            self.base_dir,
            self.scheduler_addr,
            seed=seed,
            upload_limit_bytes_per_s=limit,
            log_level=self.log_level,
        )
        cfg["scheduler"]["addrs"] = self.scheduler_addrs
        for key in ("*", name):
            for section, values in self.daemon_overrides.get(key, {}).items():
                cfg[section] = {**cfg.get(section, {}), **values}
        sock = Path(cfg["local_api"]["socket"])
        if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
            raise ClusterError(
                f"socket path {sock} is longer than {SOCKET_PATH_MAX} bytes; use a shorter --dir"
            )
        Path(cfg["storage"]["dir"]).mkdir(parents=True, exist_ok=True)
        return self._launch(name, role, cfg, socket_path=sock)

    def _launch(
        self,
        name: str,
        role: str,
        config: dict[str, Any],
        *,
        socket_path: Path | None = None,
    ) -> Member:
        member_dir = self.base_dir / name
        member_dir.mkdir(parents=True, exist_ok=True)
        member = Member(
            name=name,
            role=role,
            config_path=self.base_dir / f"{name}.yaml",
            ready_path=self.base_dir / f"{name}.ready.json",
            log_path=self.base_dir / f"{name}.log",
            data_dir=Path(config.get("storage", {}).get("dir", member_dir)),
            socket=socket_path,
        )
        member.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        member.ready_path.unlink(missing_ok=True)
        self._spawn(member)
        self.members.append(member)
        return member

    def _spawn(self, member: Member) -> None:
        base = self.scheduler_cmd if member.role == "scheduler" else self.daemon_cmd
        extra = ["--seed"] if member.role == "seed" else []
        argv = [*base, "--config", str(member.config_path), *extra, "--ready-file", str(member.ready_path)]
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                process_group=0,
            )

    def _wait_ready(self, members: Sequence[Member]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(members)
        while pending:
            for m in list(pending):
                if m.ready_path.exists():
                    try:
                        m.ready = json.loads(m.ready_path.read_text())
                    except (OSError, ValueError) as exc:
                        raise ClusterError(f"{m.name}: unreadable ready file {m.ready_path}: {exc}") from None
                    pending.remove(m)
                elif not m.alive():
                    code = m.process.returncode if m.process is not None else None
                    raise ClusterError(
                        f"{m.name} exited with code {code} before it was ready; last lines of "
                        f"{m.log_path}:\n{tail(m.log_path)}"
                    )
            if pending and time.monotonic() >= deadline:
                names = ", ".join(m.name for m in pending)
                logs = "\n".join(f"--- {m.log_path}:\n{tail(m.log_path)}" for m in pending)
                raise ClusterError(f"not ready within {self.ready_timeout_s:g} s: {names}\n{logs}")
            if pending:
                time.sleep(0.05)

    def stop_member(self, name: str) -> int | None:
        """Stop one member (SIGTERM, bounded wait, SIGKILL); returns its exit code."""
        m = self.member(name)
        self._terminate([m])
        return m.process.returncode if m.process is not None else None

    def kill_member(self, name: str) -> None:
        """SIGKILL one member (a crash: no clean shutdown) and reap it."""
        m = self.member(name)
        if m.alive():
            assert m.process is not None
            _signal(m, signal.SIGKILL)
            m.process.wait()

    def restart_member(self, name: str) -> Member:
        """Start a stopped member again with its config and data; returns once it is ready.

        A scheduler comes back on the ports it had (the daemons' configs name its address)."""
        m = self.member(name)
        if m.alive():
            raise ClusterError(f"{name} is still running")
        if m.role == "scheduler" and m.ports:  # daemons know it by address: come back on the same ports
            config = yaml.safe_load(m.config_path.read_text())
            config["port"] = m.ports.get("grpc", config.get("port", 0))
            config.setdefault("metrics", {})["port"] = m.ports.get("metrics", 0)
            m.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        m.ready_path.unlink(missing_ok=True)
        m.ready = {}
        self._spawn(m)
        self._wait_ready([m])
        return m

    def stop(self) -> None:
        """Stop the daemons, then the scheduler. Leaves every file under the base dir in place."""
        self._terminate(self.daemons)
        self._terminate([m for m in self.members if m.role == "scheduler"])
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def _lock(self) -> None:
        fd = os.open(self.base_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ClusterError(f"cluster dir {self.base_dir} is in use by another running cluster") from None
        self._lock_fd = fd

    def _terminate(self, members: Sequence[Member]) -> None:
        running = [m for m in members if m.alive()]
        for m in running:
            _signal(m, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for m in running:
            assert m.process is not None
            try:
                m.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(m, signal.SIGKILL)
                m.process.wait()

    def failed_members(self) -> list[Member]:
        """Members whose process has exited (after a successful start, any exit is a failure)."""
        return [m for m in self.members if m.process is not None and m.process.poll() is not None]

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> LocalCluster:
        import asyncio

        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)


def _signal(member: Member, sig: signal.Signals) -> None:
    if member.process is None:
        return
    try:
        member.process.send_signal(sig)
    except ProcessLookupError:
        pass
