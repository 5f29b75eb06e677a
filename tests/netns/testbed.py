"""Network-namespace testbed: N capped hosts, an origin, a scheduler and a seed peer on one bridge.

Job: build a small data centre in this machine (root), run dfly in it, time `dfget` on every host, then
remove everything. Used by `tests/netns` and `bench/swarm.py` (see ../shared/reference/testbed-notes.md).
Rules: every name it creates starts with `dfn<pid hex>x<seq>` (cleanup removes exactly that;
`cleanup_stale()` what a dead earlier run left); addresses in 10.213.0.0/16 on the veth ends only, each
namespace has just `lo` and its veth end, no default route. Caps: HTB, one class (rate = ceil, burst
256 KiB) + a ~20 ms bfifo leaf on both veth ends (namespace end = upload, bridge end = download): hosts
at R, origin and seed at R_o, scheduler uncapped; `has_netem` tells if delay/loss can be emulated.
Children: exec'd by `ip netns exec` (never a fork of this process), own process group, `*_proxy`
stripped, all reaped; `close()` runs on exit, exception, SIGINT/SIGTERM and atexit, kills what is left
per namespace (`ip netns pids`) and deletes namespaces and bridge. Every daemon is ready before a clock
starts; T_min is at TCP payload rate (wire × 1448/1514).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import yaml

from dfly.common.digest import file_digest

from .netns import (
    PAYLOAD_FRACTION,
    TestbedError,
    clean_env,
    kill_namespace,
    payload_bytes_per_s,
    sh,
    shape,
    signal_group,
    wait_exits,
)

SUBNET = "10.213"  # a /16 used by nothing else on the project's machines
# Leaf queue of every cap: ~20 ms of traffic. HTB's default leaf (pfifo of txqueuelen = 1000 packets,
# each up to a 64 KiB GSO packet) queues seconds, so ACKs of a download starve behind a busy upload.
LOOPBACK = "127.0.0.1"
IFNAME_MAX = 15
_SEQ = [0]  # testbeds made by this process
Waiting = tuple[str, "subprocess.Popen[bytes]", Path]  # (log name, process, its ready file)


def t_min_s(
    file_bytes: int, hosts: int, rate_mbit: float, origin_rate_mbit: float, *, payload: bool = True
) -> float:
    """max(F/R_o, F/R, N·F/(R_o + N·R)): no swarm can do better (payload rate unless payload=False)."""
    scale = 1.0 if payload else 1 / PAYLOAD_FRACTION
    r, r_o = payload_bytes_per_s(rate_mbit) * scale, payload_bytes_per_s(origin_rate_mbit) * scale
    return max(file_bytes / r_o, file_bytes / r, hosts * file_bytes / (r_o + hosts * r))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class Node:
    """One namespace: its name, IP, veth ends (`veth_ns` inside, `veth_br` on the bridge) and cap."""

    name: str
    ns: str
    ip: str
    veth_ns: str
    veth_br: str
    rate_mbit: float | None
    ready: dict[str, Any] | None = None  # the scheduler's ready file
    socket: Path | None = None  # a daemon's local API socket


class Testbed:
    """Bridge + origin + scheduler + seed + `hosts` capped host namespaces running dfly.

    Context manager: `__enter__` builds the network and starts every process (all ready before it
    returns); `__exit__`/`close()` removes everything (the work dir is kept after a failure or with
    keep_dir). `add_file(name, size)` puts a random file on the origin; `run_dfget(hosts, url)` times
    dfget on hosts; `origin_bytes()` is the body bytes the origin sent; `spawn(node, argv, log)` runs
    anything else inside a namespace.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        hosts: int,
        rate_mbit: float,
        origin_rate_mbit: float | None = None,
        *,
        prefix: str | None = None,
        ready_timeout_s: float = 30.0,
        log_level: str = "warning",
        use_nginx: bool | None = None,
        keep_dir: bool = False,
    ) -> None:
        if not 1 <= hosts <= 99:
            raise TestbedError("hosts must be in 1..99")
        self.n_hosts, self.rate_mbit = hosts, rate_mbit
        self.origin_rate_mbit = origin_rate_mbit if origin_rate_mbit is not None else rate_mbit
        _SEQ[0] += 1
        self.prefix = prefix or f"dfn{os.getpid():x}x{_SEQ[0]}"  # + 3 characters: <= 15 for a link
        self.ready_timeout_s, self.log_level, self.keep_dir = ready_timeout_s, log_level, keep_dir
        self.use_nginx = shutil.which("nginx") is not None if use_nginx is None else use_nginx
        self.dir = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.origin_root = self.dir / "www"
        self.bridge = self._ifname("br0")
        self.has_netem = False
        self.nodes: list[Node] = []
        self.origin = self._node("origin", "or", f"{SUBNET}.0.2", self.origin_rate_mbit)
        self.scheduler = self._node("sched", "sc", f"{SUBNET}.0.3", None)
        self.seed = self._node("seed", "sd", f"{SUBNET}.0.4", self.origin_rate_mbit)
        self.hosts = [self._node(f"h{i}", f"{i:02}", f"{SUBNET}.1.{10 + i}", rate_mbit) for i in range(hosts)]
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.scheduler_addr = ""
        self.origin_port = 8080
        self._sha: dict[str, str] = {}
        self._closed = False
        self._old_handlers: dict[int, Any] = {}

    def _ifname(self, suffix: str) -> str:
        if len(self.prefix + suffix) > IFNAME_MAX:
            raise TestbedError(f"interface name {self.prefix + suffix!r} is over {IFNAME_MAX} characters")
        return self.prefix + suffix

    def _node(self, name: str, short: str, ip: str, rate: float | None) -> Node:
        node = Node(
            name, f"{self.prefix}-{name}", ip, self._ifname(short + "a"), self._ifname(short + "b"), rate
        )
        self.nodes.append(node)
        return node

    def __enter__(self) -> Testbed:
        atexit.register(self.close)
        with contextlib.suppress(ValueError):  # not the main thread: try/finally and atexit remain
            self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._build_network()
            self._start_origin()
            self._start_dfly()
        except BaseException:
            self.keep_dir = True
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.keep_dir = self.keep_dir or exc_type is not None
        self.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through __exit__/finally, which calls close()

    def close(self) -> None:
        """Kill every process, delete namespaces, links and bridge (idempotent; signals held off)."""
        if self._closed:
            return
        self._closed = True
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for _, proc in self.procs:
                signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            for _, proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            for node in self.nodes:  # SIGKILL to all that is left, ours or not, then reap ours
                kill_namespace(node.ns)
            for _, proc in self.procs:
                proc.wait()
            for node in self.nodes:
                sh("ip", "link", "del", node.veth_br, check=False)  # both ends, now (netns del: later)
                sh("ip", "netns", "del", node.ns, check=False)
            sh("ip", "link", "del", self.bridge, check=False)
            if self.keep_dir:
                print(f"testbed: logs and configs kept in {self.dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            atexit.unregister(self.close)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _build_network(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for node in self.nodes:
            ns, a, b = node.ns, node.veth_ns, node.veth_br
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", b, "type", "veth", "peer", "name", a, "netns", ns)
            sh("ip", "link", "set", b, "master", self.bridge, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{node.ip}/16", "dev", a)
            sh("ip", "-n", ns, "link", "set", a, "up")
        probe = ("tc", "qdisc", "add", "dev", self.scheduler.veth_br, "root", "netem", "delay", "1ms")
        self.has_netem = sh(*probe, check=False).returncode == 0  # the scheduler stays uncapped
        if self.has_netem:
            sh("tc", "qdisc", "del", "dev", self.scheduler.veth_br, "root")
        for node in self.nodes:
            if node.rate_mbit is not None:
                shape(["tc"], node.veth_br, node.rate_mbit)
                shape(["tc", "-n", node.ns], node.veth_ns, node.rate_mbit)

    def spawn(self, node: Node, argv: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        """Start `argv` inside `node`'s namespace (exec, own process group, log in DIR/<log_name>.log)."""
        argv, out, err = ["ip", "netns", "exec", node.ns, *argv], subprocess.DEVNULL, subprocess.STDOUT
        with open(self.dir / f"{log_name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=out, stdout=log, stderr=err, env=clean_env(), process_group=0)
        self.procs.append((log_name, proc))
        return proc

    def _wait_ready(self, waits: Sequence[Waiting]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(waits)
        while pending:
            for item in list(pending):
                name, proc, path = item
                if path.exists() and path.stat().st_size > 0:
                    pending.remove(item)
                elif proc.poll() is not None:
                    raise TestbedError(f"{name} exited ({proc.returncode}) before ready:\n{self.tail(name)}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(n for n, _, _ in pending)
                raise TestbedError(f"not ready within {self.ready_timeout_s:g} s: {names} (see {self.dir})")
            if pending:
                time.sleep(0.02)

    def tail(self, log_name: str, lines: int = 20) -> str:
        """The last lines of DIR/<log_name>.log."""
        log = self.dir / f"{log_name}.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def _start_origin(self) -> None:
        self.origin_root.mkdir()
        if self.use_nginx:
            conf = self.dir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.dir, root=self.origin_root, ip=self.origin.ip,
                                              port=self.origin_port))  # fmt: skip
            argv = ["nginx", "-p", str(self.dir), "-e", str(self.dir / "nginx.err"), "-c", str(conf)]
            ready = self.dir / "nginx.pid"  # written after the listening socket is open
            self._wait_ready([("origin", self.spawn(self.origin, argv, "origin"), ready)])
            return
        ready = self.dir / "origin.ready"
        argv = [sys.executable, "-m", "dfly.devtools.origin", "--root", str(self.origin_root),
                "--host", self.origin.ip, "--port", "0", "--ready-file", str(ready)]  # fmt: skip
        self._wait_ready([("origin", self.spawn(self.origin, argv, "origin"), ready)])
        self.origin_port = int(json.loads(ready.read_text())["ports"]["http"])

    def _start_dfly(self) -> None:
        sched = {"listen_ip": self.scheduler.ip, "port": 0, "metrics": {"ip": LOOPBACK, "port": 0},
                 "log_level": self.log_level}  # fmt: skip
        self._wait_ready([self._launch(self.scheduler, ["dfly.cli.dfly", "scheduler"], sched)])
        self.scheduler.ready = json.loads((self.dir / "sched.ready").read_text())
        self.scheduler_addr = f"{self.scheduler.ip}:{self.scheduler.ready['ports']['grpc']}"
        cmd = ["dfly.cli.dfdaemon"]
        daemons = [(self.seed, [*cmd, "--seed"])] + [(h, cmd) for h in self.hosts]
        self._wait_ready([self._launch(node, argv, self._daemon_config(node)) for node, argv in daemons])

    def _daemon_config(self, node: Node) -> dict[str, Any]:
        """The same config for every daemon, but for its own IP, hostname, storage and socket."""
        base = self.dir / node.name
        node.socket = base / "d.sock"  # the work dir is short: well under the 107-byte sun_path limit
        (base / "data").mkdir(parents=True)
        return {
            "host": {"hostname": f"{self.prefix}{node.name}", "advertise_ip": node.ip},
            "scheduler": {"addrs": [self.scheduler_addr]},
            "storage": {"dir": str(base / "data")},
            "control": {"ip": node.ip, "port": 0, "trusted_schedulers": [self.scheduler.ip]},
            "piece": {"ip": node.ip, "port": 0},
            **{key: {"ip": LOOPBACK, "port": 0} for key in ("proxy", "metrics", "health")},
            "local_api": {"socket": str(node.socket)},
            "log_level": self.log_level,
        }

    def _launch(self, node: Node, module: list[str], config: dict[str, Any]) -> Waiting:
        cfg, ready = self.dir / f"{node.name}.yaml", self.dir / f"{node.name}.ready"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", *module, "--config", str(cfg), "--ready-file", str(ready)]
        return node.name, self.spawn(node, argv, node.name), ready

    def check_alive(self) -> None:
        """Raise if any long-running member (origin, scheduler, daemons) has exited."""
        for name, proc in self.procs:
            if not name.startswith("dfget") and proc.poll() is not None:
                raise TestbedError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")

    def add_file(self, name: str, size: int) -> tuple[str, str]:
        """Write `size` random bytes as `name` on the origin; returns (URL, sha256 hex)."""
        with open(self.origin_root / name, "wb") as f:
            for off in range(0, size, 1 << 20):
                f.write(os.urandom(min(1 << 20, size - off)))
        self._sha[name] = file_digest(self.origin_root / name).value
        return f"http://{self.origin.ip}:{self.origin_port}/{name}", self._sha[name]

    def run_dfget(
        self, hosts: Sequence[int] | None, url: str, timeout_s: float = 120.0, run: str = "run"
    ) -> list[float]:
        """dfget `url` on the hosts (indices; all if None) at once; seconds from t0 to each exit."""

        def dfget(node: Node, out: Path) -> list[str]:
            return [
                sys.executable,
                "-m",
                "dfly.cli.dfget",
                "-e",
                str(node.socket),
                "--no-progress",
                url,
                "-O",
                str(out),
            ]

        return self.run_clients(hosts, url, dfget, f"dfget-{run}", timeout_s)

    def run_curl(self, hosts: Sequence[int] | None, url: str, timeout_s: float = 120.0) -> list[float]:
        """Plain HTTP baseline: `curl -o` from the origin on the hosts at once."""
        return self.run_clients(
            hosts, url, lambda _node, out: ["curl", "-sf", "-o", str(out), url], "curl", timeout_s
        )

    def run_clients(
        self,
        hosts: Sequence[int] | None,
        url: str,
        command: Callable[[Node, Path], list[str]],
        label: str,
        timeout_s: float = 120.0,
    ) -> list[float]:
        """Run one client per host at once; seconds from t0 to each exit.

        t0 is taken just before the first client is launched; all are launched, then waited for
        (pidfds). Every output's sha256 must equal the origin file's (if added with add_file); a failed
        or hung client or a wrong digest raises TestbedError.
        """
        indices = list(range(self.n_hosts)) if hosts is None else list(hosts)
        name = url.rsplit("/", 1)[-1]
        outs = [self.dir / self.hosts[i].name / f"{label}-{name}" for i in indices]
        procs: list[subprocess.Popen[bytes]] = []
        t0 = time.monotonic()
        for i, out in zip(indices, outs, strict=True):
            procs.append(self.spawn(self.hosts[i], command(self.hosts[i], out), f"{label}-h{i}"))
        ends = wait_exits(procs, t0 + timeout_s)
        for i, proc, out, end in zip(indices, procs, outs, ends, strict=True):
            if end is None or proc.returncode != 0:
                raise TestbedError(
                    f"{label} on h{i} failed ({proc.returncode}):\n{self.tail(f'{label}-h{i}')}"
                )
            if name in self._sha and (sha := file_digest(out).value) != self._sha[name]:
                raise TestbedError(f"h{i}: sha256 {sha} != origin's {self._sha[name]}")
        return [end - t0 for end in ends if end is not None]

    def dfly_pids(self) -> list[int]:
        """Scheduler, seed and daemons (the dfly side of `cpu_s`; clients are counted by the caller)."""
        dfly = {self.scheduler.name, self.seed.name, *(host.name for host in self.hosts)}
        return [proc.pid for name, proc in self.procs if name in dfly and proc.poll() is None]

    def origin_bytes(self) -> int:
        """Body bytes the origin has sent (nginx's access log of $body_bytes_sent, or `GET /_stats`)."""
        if self.use_nginx:
            return sum(int(x) for x in (self.dir / "access.log").read_text().split())
        code = "import sys,urllib.request as u;sys.stdout.write(u.urlopen(sys.argv[1]).read().decode())"
        argv = [sys.executable, "-c", code, f"http://{self.origin.ip}:{self.origin_port}/_stats"]
        return int(json.loads(sh("ip", "netns", "exec", self.origin.ns, *argv).stdout)["bytes_sent"])


# One nginx process (no master, so nothing outlives it), sendfile, an access log of body bytes only.
NGINX_CONF = """daemon off; master_process off; user root;
pid {dir}/nginx.pid; error_log {dir}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{
  log_format bytes '$body_bytes_sent'; access_log {dir}/access.log bytes;
  client_body_temp_path {dir}/nginx-client; proxy_temp_path {dir}/nginx-proxy;
  fastcgi_temp_path {dir}/nginx-fastcgi; uwsgi_temp_path {dir}/nginx-uwsgi; scgi_temp_path {dir}/nginx-scgi;
  sendfile on; tcp_nopush on; default_type application/octet-stream;
  server {{ listen {ip}:{port}; root {root}; }}
}}
"""
