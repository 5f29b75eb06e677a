"""A throw-away dockerd for the Docker conformance tests (registry mirror, HTTP(S)_PROXY).

`Dockerd(...)` starts Debian's dockerd 20.10 with every path under a short directory of /tmp (data,
exec root, pid file, API socket, trust key), vfs storage, no bridge and no iptables, so it touches
nothing of the host's; `docker(...)` runs the CLI against it. Options: `--registry-mirror`,
`--insecure-registry`, and extra environment (HTTP_PROXY, HTTPS_PROXY, SSL_CERT_FILE), which dockerd
reads as a systemd drop-in would give it. Stopped and removed on exit (also /run/docker if it made it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from registry_kit import terminate

RUN_DIR = Path("/run/docker")
NO_DOCKER = [tool for tool in ("dockerd", "docker") if shutil.which(tool) is None]
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


class Dockerd:
    def __init__(
        self,
        *,
        mirror: str = "",
        insecure_registries: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.mirror = mirror
        self.insecure_registries = list(insecure_registries)
        # only what the test gives: none of the caller's proxy or CA settings leak in
        self.env = {k: v for k, v in os.environ.items() if k.upper() not in _PROXY_VARIABLES}
        self.env |= dict(env or {})
        # under /tmp: containerd's socket paths must be short
        self.dir = Path(tempfile.mkdtemp(prefix="dfly-dk-", dir="/tmp"))
        self.socket = self.dir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.made_run_dir = False

    def __enter__(self) -> Dockerd:
        argv = ["dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "docker.pid"), "-H", f"unix://{self.socket}",
                "--config-file", str(self.dir / "daemon.json"), "--storage-driver", "vfs",
                "--bridge", "none", "--iptables=false", "--ip6tables=false"]  # fmt: skip
        if self.mirror:
            argv += ["--registry-mirror", self.mirror]
        for registry in self.insecure_registries:
            argv += ["--insecure-registry", registry]
        # its trust key stays here too (by default dockerd writes /etc/docker/key.json)
        (self.dir / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(self.dir / "key.json")}))
        self.made_run_dir = not RUN_DIR.exists()
        with open(self.dir / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while self.docker("version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"dockerd did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.made_run_dir:  # dockerd always makes /run/docker/plugins, whatever its exec root
            shutil.rmtree(RUN_DIR, ignore_errors=True)

    def log(self) -> str:
        return (self.dir / "dockerd.log").read_text(errors="replace")

    def docker(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "-H", f"unix://{self.socket}", *args]
        env = {k: v for k, v in self.env.items() if k.upper() not in _PROXY_VARIABLES}  # local socket only
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)

    def image_layers(self, reference: str) -> tuple[str, int]:
        """(image id, number of layers) of a pulled image."""
        inspect = self.docker("image", "inspect", reference)
        if inspect.returncode != 0:
            raise RuntimeError(inspect.stderr)
        [image] = json.loads(inspect.stdout)
        return str(image["Id"]), len(image["RootFS"]["Layers"])
