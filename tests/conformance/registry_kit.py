"""A real registry for the conformance tests: Debian's `docker-registry` on 127.0.0.1, and an image.

`Registry(dir)` starts distribution 2.8 (plain HTTP, or HTTPS with a test certificate; on 127.0.0.1
unless given another address, e.g. in registry_netns.py's namespace) with filesystem storage and an
access log (combined format, so each line carries the request and the client's User-Agent);
`blob_gets()` lists the blob GETs it served. `push_image(registry, dir)` builds an OCI image without
network (a config and `layers` gzip tar layers of random, incompressible data) as an OCI layout and
pushes it with skopeo; it returns the image reference and every blob digest. Everything it starts is
stopped by `stop()` / the context exit.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

OCI = "application/vnd.oci.image"
MISSING = [tool for tool in ("docker-registry", "skopeo") if shutil.which(tool) is None]
_BLOB_GET = re.compile(
    r'"GET /v2/(?P<name>[^ ]+)/blobs/(?P<digest>sha256:[a-f0-9]{64}) [^"]*" (?P<status>\d+) (?P<bytes>\d+) '
    r'"[^"]*" "(?P<ua>[^"]*)"'
)


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, a bounded wait, then SIGKILL."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    def __init__(
        self,
        directory: Path,
        *,
        redirect_to: str = "",
        credentials: tuple[str, str] | None = None,
        token_auth: str = "",
        address: str = "127.0.0.1",
        exec_prefix: Sequence[str] = (),
        tls: tuple[Path, Path, Path] | None = None,
        port: int = 0,
    ) -> None:
        """`redirect_to`: a base URL serving this registry's storage dir: blob GETs and HEADs then answer 307
        to it (distribution's `redirect` storage middleware, as S3-backed registries do). `credentials`:
        (user, password) required for every request (htpasswd auth: 401 + `WWW-Authenticate: Basic`), or
        what the token server wants when `token_auth` (an `auth:` config section, from
        token_server.TokenServer) is given: then 401 + `WWW-Authenticate: Bearer realm=...`.
        `address` / `exec_prefix`: where it listens and what runs it (`ip netns exec NS` for a registry
        behind a shaped link, bench/image_pull.py). `tls`: (certificate, key, CA) to serve HTTPS with
        (the CA checks the start-up probe); `port`: 0 = a free one."""
        self.exec_prefix = list(exec_prefix)
        self.token_auth = token_auth
        self.dir = directory
        self.redirect_to = redirect_to
        self.credentials = credentials
        self.tls = tls
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://{address}:{self.port}"
        self.host = f"{address}:{self.port}"
        self.log_path = directory / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Registry:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.yml"
        middleware = ""
        if self.redirect_to:
            redirect = f"    - name: redirect\n      options:\n        baseurl: {self.redirect_to}\n"
            middleware = "middleware:\n  storage:\n" + redirect
        if self.token_auth:
            middleware += self.token_auth
        elif self.credentials:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt  # bcrypt through libxcrypt; deprecated since 3.11, present until 3.13

            user, password = self.credentials
            (self.dir / "htpasswd").write_text(
                f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n"
            )
            middleware += f"auth:\n  htpasswd:\n    realm: dfly-test\n    path: {self.dir / 'htpasswd'}\n"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            + (f"  tls:\n    certificate: {self.tls[0]}\n    key: {self.tls[1]}\n" if self.tls else "")
            + middleware
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.exec_prefix, "docker-registry", "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        probe_tls = ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=probe_tls) as answer:
                    if answer.status == 200:
                        return self
            except urllib.error.HTTPError as error:
                if error.code == 401 and (self.credentials or self.token_auth):
                    return self  # up, and asking for credentials
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        terminate(self.proc)

    @property
    def storage_dir(self) -> Path:
        return self.dir / "data"

    def blob_gets(self) -> list[tuple[str, str, int]]:
        """(digest, user agent, body bytes) of every blob GET the registry answered so far."""
        text = self.log_path.read_text(errors="replace")
        return [(m["digest"], m["ua"], int(m["bytes"])) for m in _BLOB_GET.finditer(text)]

    def mirror_heads(self) -> list[str]:
        """Access-log lines of HEAD requests made by a dfly daemon (User-Agent dfly-daemon): the access
        checks of clients' credentials before a blob is served from the swarm."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if '"HEAD ' in line and "dfly-daemon" in line]

    def blob_statuses(self) -> list[tuple[str, str, int]]:
        """(digest, user agent, HTTP status) of every blob GET the registry answered so far."""
        text = self.log_path.read_text(errors="replace")
        return [(m["digest"], m["ua"], int(m["status"])) for m in _BLOB_GET.finditer(text)]


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _layer(name: str, size: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(f"data/{name}")
        info.size = size
        tar.addfile(info, io.BytesIO(random.randbytes(size)))  # incompressible: the layer is ~size
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)


def push_image(
    registry: Registry,
    directory: Path,
    *,
    layers: int = 2,
    layer_bytes: int = 4 << 20,
    name: str = "demo/app",
) -> tuple[str, list[str]]:
    """Build and push `<name>:1`; returns (reference, [config digest, layer digests...])."""
    layout = directory / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layer_descs, diff_ids = [], []
    for k in range(layers):
        data = _layer(f"file-{k}", layer_bytes)
        digest, size = _blob(layout, data)
        layer_descs.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}
        )
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
    rootfs = {"type": "layers", "diff_ids": diff_ids}
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode()
    config_digest, config_size = _blob(layout, config)
    config_desc = {"mediaType": f"{OCI}.config.v1+json", "digest": config_digest, "size": config_size}
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": f"{OCI}.manifest.v1+json",
            "config": config_desc,
            "layers": layer_descs,
        }
    ).encode()
    manifest_digest, manifest_size = _blob(layout, manifest)
    entry = {"mediaType": f"{OCI}.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
             "annotations": {"org.opencontainers.image.ref.name": "1"}}  # fmt: skip
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    reference = f"{registry.host}/{name}:1"
    creds = ["--dest-creds", ":".join(registry.credentials)] if registry.credentials else []
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", *creds, f"oci:{layout}:1", f"docker://{reference}"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return reference, [config_digest, *(str(d["digest"]) for d in layer_descs)]


def registries_conf(path: Path, registry: Registry, mirror_port: int) -> Path:
    path.write_text(
        "unqualified-search-registries = []\n"
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "127.0.0.1:{mirror_port}"\ninsecure = true\n'
    )
    return path


def pulled_blobs(directory: Path) -> dict[str, str]:
    """skopeo `dir:` output: {file name: sha256 of its bytes} for every blob file."""
    out = {}
    for entry in directory.iterdir():
        if re.fullmatch(r"[a-f0-9]{64}", entry.name):
            out[entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest()
    return out


class Containerd:
    """A throw-away containerd with every path under `directory`; `ctr(*args)` runs ctr against it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.socket = directory / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Containerd:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        disabled = ", ".join(
            f'"io.containerd.{p}"'
            for p in (
                "grpc.v1.cri",
                "snapshotter.v1.aufs",
                "snapshotter.v1.btrfs",
                "snapshotter.v1.devmapper",
                "snapshotter.v1.zfs",
            )
        )
        config.write_text(
            f'version = 2\nroot = "{self.dir / "root"}"\nstate = "{self.dir / "state"}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.socket}"\n[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            f'[plugins]\n  [plugins."io.containerd.internal.v1.opt"]\n    path = "{self.dir / "opt"}"\n'
        )
        with open(self.dir / "containerd.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while subprocess.run(self.ctr_argv("version"), capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"containerd did not start:\n{(self.dir / 'containerd.log').read_text()[-2000:]}"
                )
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        terminate(self.proc)

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "-n", "dfly-test", *args]

    def pull(self, reference: str, hosts_dir: Path) -> subprocess.CompletedProcess[str]:
        argv = self.ctr_argv(
            "images", "pull", "--snapshotter", "native", "--hosts-dir", str(hosts_dir), reference
        )
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def content_digests(self) -> set[str]:
        listing = subprocess.run(
            self.ctr_argv("content", "ls", "-q"), capture_output=True, text=True, check=True
        )
        return set(listing.stdout.split())


def hosts_dir(directory: Path, registry: Registry, mirror_port: int) -> Path:
    """containerd's hosts.toml: the registry's pulls and resolves go to the mirror first."""
    (directory / registry.host).mkdir(parents=True, exist_ok=True)
    (directory / registry.host / "hosts.toml").write_text(
        f'server = "{registry.url}"\n[host."http://127.0.0.1:{mirror_port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return directory
