"""Network-namespace testbed: N capped hosts, an origin, a scheduler and a seed peer on one bridge.

Job: build a small data centre in this machine (root), run dfly in it (or only the origin, for the
baselines: start_dfly=False), time clients on every host (`clients.run_staggered`: all at once or
staggered, several files per host), then remove everything. Used by `tests/netns` and `bench/swarm.py`
(see ../shared/reference/testbed-notes.md).
Rules: every name it creates starts with `dfn<pid hex>x<seq>` (cleanup removes exactly that;
`cleanup_stale()` what a dead earlier run left); addresses in 10.213.0.0/16 on the veth ends only, each
namespace has just `lo` and its veth end, no default route. Caps: HTB, one class (rate = ceil, burst
256 KiB) + a ~20 ms bfifo leaf on both veth ends (namespace end = upload, bridge end = download): hosts
at R, origin and seed at R_o (a rate of 0: that link is not shaped), scheduler uncapped; `has_netem`
tells if delay/loss can be emulated.
Children: exec'd by `ip netns exec` (never a fork of this process), own process group, `*_proxy`
stripped, all reaped; `close()` runs on exit, exception, SIGINT/SIGTERM and atexit, kills what is left
per namespace (`ip netns pids`) and deletes namespaces and bridge. Every daemon is ready before a clock
starts; T_min is at TCP payload rate (wire × 1448/1514). A host dir DIR/<host> holds its outputs.
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
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import yaml

from dfly.common.digest import file_digest

from .clients import run_staggered
from .netns import (
    PAYLOAD_FRACTION,
    Node,
    TestbedError,
    build_network,
    clean_env,
    drop_data,
    kill_namespace,
    payload_bytes_per_s,
    sh,
    signal_group,
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
    """max(F/R_o, F/R, N·F/(R_o + N·R)): no swarm can do better (payload rate unless payload=False).

    The swarm term never exceeds F/R, so this is also the bound of one host alone (staggered starts).
    Uncapped links (a rate of 0) have no such bound: 0.0.
    """
    if rate_mbit <= 0 or origin_rate_mbit <= 0:
        return 0.0
    scale = 1.0 if payload else 1 / PAYLOAD_FRACTION
    r, r_o = payload_bytes_per_s(rate_mbit) * scale, payload_bytes_per_s(origin_rate_mbit) * scale
    return max(file_bytes / r_o, file_bytes / r, hosts * file_bytes / (r_o + hosts * r))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class Testbed:
    """Bridge + origin + scheduler + seed + `hosts` capped host namespaces running dfly.

    Context manager: `__enter__` builds the network and starts every process (all ready before it
    returns); `__exit__`/`close()` removes everything (with keep_dir the work dir stays; after a
    failure, but not after Ctrl-C/SIGTERM, its logs and configs stay, its data files ≥ 1 MiB do not).
    `add_file(name, size)` puts a random file on the origin (its digest in `sha256`); `run_dfget(hosts,
    urls)` / `run_curl` time dfget / curl on hosts; `origin_bytes()` is the body bytes the origin sent;
    `spawn(node, argv, log)` runs anything else inside a namespace.
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
        start_dfly: bool = True,
    ) -> None:
        if not 1 <= hosts <= 99:
            raise TestbedError("hosts must be in 1..99")
        self.n_hosts, self.rate_mbit = hosts, rate_mbit
        self.origin_rate_mbit = origin_rate_mbit if origin_rate_mbit is not None else rate_mbit
        _SEQ[0] += 1
        self.prefix = prefix or f"dfn{os.getpid():x}x{_SEQ[0]}"  # + 3 characters: <= 15 for a link
        self.ready_timeout_s, self.log_level, self.keep_dir = ready_timeout_s, log_level, keep_dir
        self.start_dfly = start_dfly
        self.use_nginx = shutil.which("nginx") is not None if use_nginx is None else use_nginx
        self.dir = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.origin_root = self.dir / "www"
        self.bridge = self._ifname("br0")
        self.has_netem = False
        self.nodes: list[Node] = []
        self.origin = self._node("origin", "or", f"{SUBNET}.0.2", self.origin_rate_mbit or None)
        self.scheduler = self._node("sched", "sc", f"{SUBNET}.0.3", None)
        self.seed = self._node("seed", "sd", f"{SUBNET}.0.4", self.origin_rate_mbit or None)
        self.hosts = [
            self._node(f"h{i}", f"{i:02}", f"{SUBNET}.1.{10 + i}", rate_mbit or None) for i in range(hosts)
        ]
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.scheduler_addr = ""
        self.origin_port = 8080
        self.sha256: dict[str, str] = {}  # file name on the origin -> hex digest
        self._closed = self._failed = False
        self._old_handlers: dict[int, Any] = {}
        self._members = {"origin", *(node.name for node in self.nodes)}  # long-running processes

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
            if self.start_dfly:
                self._start_dfly()
        except BaseException as exc:
            self._failed = not isinstance(exc, KeyboardInterrupt | SystemExit)
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._failed = exc_type is not None and not issubclass(exc_type, KeyboardInterrupt | SystemExit)
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
            if self.keep_dir or self._failed:
                if not self.keep_dir:
                    drop_data(self.dir)
                print(f"testbed: logs and configs kept in {self.dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            atexit.unregister(self.close)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _build_network(self) -> None:
        self.has_netem = build_network(self.bridge, self.nodes, probe=self.scheduler)

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
            if name in self._members and proc.poll() is not None:
                raise TestbedError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")

    def add_file(self, name: str, size: int) -> tuple[str, str]:
        """Write `size` random bytes as `name` on the origin; returns (URL, sha256 hex)."""
        with open(self.origin_root / name, "wb") as f:
            for off in range(0, size, 1 << 20):
                f.write(os.urandom(min(1 << 20, size - off)))
        self.sha256[name] = file_digest(self.origin_root / name).value
        return f"http://{self.origin.ip}:{self.origin_port}/{name}", self.sha256[name]

    def run_dfget(
        self,
        hosts: Sequence[int] | None,
        urls: str | Sequence[str],
        timeout_s: float = 120.0,
        run: str = "run",
        stagger_s: float = 0.0,
        extra_args: Sequence[str] = (),
    ) -> list[float]:
        """dfget every URL on the hosts (indices; all if None), one dfget per URL, all at once per host;
        `extra_args` go on every dfget command line (e.g. `--piece-length 512KiB`)."""

        def dfget(node: Node, url: str, out: Path) -> list[str]:
            return [sys.executable, "-m", "dfly.cli.dfget", "-e", str(node.socket), "--no-progress",
                    *extra_args, url, "-O", str(out)]  # fmt: skip

        return self.run_clients(hosts, urls, dfget, f"dfget-{run}", timeout_s, stagger_s)

    def run_curl(
        self, hosts: Sequence[int] | None, urls: str | Sequence[str], timeout_s: float = 120.0,
        stagger_s: float = 0.0,
    ) -> list[float]:  # fmt: skip
        """Plain HTTP baseline: `curl -o` of every URL from the origin, one curl per URL, on the hosts."""
        return self.run_clients(
            hosts, urls, lambda _node, url, out: ["curl", "-sf", "-o", str(out), url], "curl", timeout_s,
            stagger_s,
        )  # fmt: skip

    def run_clients(
        self,
        hosts: Sequence[int] | None,
        urls: str | Sequence[str],
        command: Callable[[Node, str, Path], list[str]],
        label: str,
        timeout_s: float = 120.0,
        stagger_s: float = 0.0,
    ) -> list[float]:
        """Run one client per URL on every host; seconds from each host's start to its last exit.

        Host k of `hosts` starts at t0 + k·stagger_s (`clients.run_staggered`); its clients are launched
        together. Every output's sha256 must equal the origin file's (if added with add_file); a failed
        or hung client or a wrong digest raises TestbedError.
        """
        indices = list(range(self.n_hosts)) if hosts is None else list(hosts)
        names = [url.rsplit("/", 1)[-1] for url in ([urls] if isinstance(urls, str) else urls)]
        urls = [urls] if isinstance(urls, str) else list(urls)

        def out(i: int, name: str) -> Path:
            return self.dir / self.hosts[i].name / f"{label}-{name}"

        def launch(k: int) -> list[subprocess.Popen[bytes]]:
            node = self.hosts[indices[k]]
            (self.dir / node.name).mkdir(exist_ok=True)
            return [self.spawn(node, command(node, url, out(indices[k], name)), f"{label}-{node.name}")
                    for url, name in zip(urls, names, strict=True)]  # fmt: skip

        def describe(k: int) -> str:
            return f"{label} on h{indices[k]}:\n{self.tail(f'{label}-h{indices[k]}')}"

        times = run_staggered(len(indices), stagger_s, launch, timeout_s, describe=describe)
        self.verify([(out(i, name), name) for i in indices for name in names])
        return times

    def verify(self, outputs: Sequence[tuple[Path, str]]) -> None:
        """Raise TestbedError unless every (output, origin file name) pair has the origin's sha256."""
        for path, name in outputs:
            if name in self.sha256 and (sha := file_digest(path).value) != self.sha256[name]:
                raise TestbedError(f"{path}: sha256 {sha} != origin's {self.sha256[name]}")

    def dfly_pids(self) -> dict[str, list[int]]:
        """Scheduler, seed and daemons by role (the dfly side of `cpu_s`; clients are counted by the
        caller): {"scheduler": [...], "seed": [...], "daemons": [...]}."""
        roles = {self.scheduler.name: "scheduler", self.seed.name: "seed"}
        roles.update((host.name, "daemons") for host in self.hosts)
        groups: dict[str, list[int]] = {"scheduler": [], "seed": [], "daemons": []}
        for name, proc in self.procs:
            if name in roles and proc.poll() is None:
                groups[roles[name]].append(proc.pid)
        return groups

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
