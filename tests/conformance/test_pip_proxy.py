"""pip through the dfdaemon's forward proxy: wheels through P2P, index pages forwarded.

Real processes: the dfly test origin on 127.0.0.1 serving a PEP 503 simple index and a wheel built here
(stdlib `zipfile`, no network), a scheduler, a seed and two peers whose `proxy.rules` send `.whl` files
through P2P. The real pip of this venv (`--isolated`, so no machine-wide index or wheel directory
applies; `--proxy`, so it ignores `no_proxy`) runs on each peer's proxy in turn. Checks: both runs get
the wheel with the sha256 the index names (pip checks it too), the second one installs it, the origin
reads the wheel once in all (besides a 1-byte probe) and never for pip itself, and the index page
reaches pip directly.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfly.cluster import LocalCluster
from dfly.devtools.origin import Origin, pseudo_random_bytes

pytestmark = pytest.mark.integration
MiB = 1 << 20
WHEEL = "dflyprobe-1.0-py3-none-any.whl"


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as server:
        yield server


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(path: Path, payload_bytes: int) -> str:
    """A valid pure-Python wheel holding `payload_bytes` of data (stored, not deflated); its sha256."""
    files = {
        "dflyprobe/__init__.py": b'VERSION = "1.0"\n',
        "dflyprobe/payload.bin": pseudo_random_bytes(payload_bytes, seed=61),
        "dflyprobe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: dflyprobe\nVersion: 1.0\n",
        "dflyprobe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: dfly-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append("dflyprobe-1.0.dist-info/RECORD,,")
    files["dflyprobe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip(proxy: int, index_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "--no-input",
            "--proxy", f"http://127.0.0.1:{proxy}", *args, "--no-deps", "--no-cache-dir",
            "--index-url", index_url, "dflyprobe==1.0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_pip_downloads_and_installs_a_wheel_through_p2p(origin: Origin, tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL
    digest = build_wheel(wheel, 6 * MiB)
    origin.add_bytes(f"/packages/{WHEEL}", wheel.read_bytes())
    page = f'<html><body><a href="../../packages/{WHEEL}#sha256={digest}">{WHEEL}</a></body></html>\n'
    origin.add_bytes("/simple/dflyprobe/", page.encode(), headers={"Content-Type": "text/html"})
    index_url = origin.url("/simple/")
    proxy = {"proxy": {"allowed_hosts": [origin.base_url], "rules": [r"\.whl$"]}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_overrides={"*": proxy}) as cluster:
        first, second = (peer.ports["proxy"] for peer in cluster.peers)
        fetched = pip(first, index_url, "download", "--dest", str(tmp_path / "dl"))
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        assert hashlib.sha256((tmp_path / "dl" / WHEEL).read_bytes()).hexdigest() == digest
        installed = pip(second, index_url, "install", "--target", str(tmp_path / "site"))
        assert installed.returncode == 0, installed.stdout + installed.stderr
        payload = (tmp_path / "site" / "dflyprobe" / "payload.bin").read_bytes()
        assert payload == pseudo_random_bytes(6 * MiB, seed=61)
    wheel_gets = [r for r in origin.request_log() if r.method == "GET" and r.path.endswith(".whl")]
    assert wheel_gets, "the wheel was never requested from the origin"
    assert not [r for r in wheel_gets if "pip" in r.headers.get("User-Agent", "")]  # only the seed
    page_gets = [r for r in origin.request_log() if r.path == "/simple/dflyprobe/"]
    assert len(page_gets) == 2
    assert all("pip" in r.headers.get("User-Agent", "") for r in page_gets)
    probes = [r for r in wheel_gets if r.headers.get("Range") == "bytes=0-0"]  # the seed's length probe
    assert len(wheel_gets) - len(probes) == 1  # one full read of the wheel for both hosts
    assert origin.stats()["by_path"][f"/packages/{WHEEL}"] == wheel.stat().st_size + len(probes)
