"""mTLS on the control plane (`security.tls`): a cluster works with it, strangers are refused.

Real processes: a scheduler, a seed and two peers on 127.0.0.1, all with certificates from one test CA.
Two dfgets go through the swarm (host announce, AnnouncePeer streams and the seed trigger all over
mTLS). Then callers without a certificate, with one from another CA, or speaking plain TCP, are refused
by the scheduler and by the seed's control port, and nothing is fetched for them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clusterkit import dfget_ok, stats

from dfly.api import daemon_pb2 as dpb
from dfly.api import daemon_pb2_grpc as dpb_grpc
from dfly.api import scheduler_pb2 as pb
from dfly.api import scheduler_pb2_grpc as pb_grpc
from dfly.cluster import LocalCluster
from dfly.common.digest import file_digest
from dfly.common.errors import ProtocolError
from dfly.common.pieces import MiB
from dfly.daemon.transfer.buffers import BufferPool
from dfly.daemon.transfer.client import RemoteError, connect_parent
from dfly.devtools.origin import Origin, make_file
from dfly.devtools.pki import make_pki

pytestmark = pytest.mark.integration

FILE_BYTES = 8 * MiB
RPC_TIMEOUT_S = 5.0


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    with Origin(tmp_path / "www") as server:
        yield server


def credentials(pki: dict[str, Path], name: str | None, ca: Path) -> grpc.ChannelCredentials:
    if name is None:  # trusts the cluster's CA, presents no certificate
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=pki[f"{name}.key"].read_bytes(),
        certificate_chain=pki[name].read_bytes(),
    )


def refused(target: str, creds: grpc.ChannelCredentials | None, call: str) -> grpc.StatusCode:
    """Make one RPC as a stranger; the status code it got (the test fails if it was served)."""
    channel = grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    with channel:
        try:
            if call == "scheduler":
                pb_grpc.SchedulerStub(channel).AnnounceHost(
                    pb.AnnounceHostRequest(host=pb.HostInfo(host_id="127.0.0.1-stranger", ip="127.0.0.1")),
                    timeout=RPC_TIMEOUT_S,
                )
            else:
                request = dpb.DownloadTaskRequest(download=pb.Download(url="http://127.0.0.1:1/stolen"))
                dpb_grpc.DfdaemonControlStub(channel).DownloadTask(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    pytest.fail(f"a stranger was served by the {call}")


def test_cluster_over_mtls_works_and_refuses_strangers(origin: Origin, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["member"])
    rogue = make_pki(tmp_path / "rogue", ["stranger"], ca_name="another CA")
    tls: dict[str, Any] = {
        "tls": {"ca_cert": str(pki["ca"]), "cert": str(pki["member"]), "key": str(pki["member.key"])}
    }
    overrides = {"*": {"security": tls}}
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=3)
    with LocalCluster(
        tmp_path / "c", peers=2, daemon_overrides=overrides, scheduler_overrides={"security": tls}
    ) as cluster:
        for peer in cluster.peers:
            dfget_ok(peer, origin.url("/f.bin"), tmp_path / peer.name)
            assert file_digest(tmp_path / peer.name).value == digest
        assert origin.bytes_sent <= 1.1 * FILE_BYTES

        scheduler = cluster.scheduler_addr
        control = f"127.0.0.1:{cluster.seed.ports['control']}"
        stolen_before = origin.request_log()
        for target, call in ((scheduler, "scheduler"), (control, "control")):
            assert refused(target, None, call) is grpc.StatusCode.UNAVAILABLE  # plain TCP
            assert refused(target, credentials(pki, None, pki["ca"]), call) is grpc.StatusCode.UNAVAILABLE
            assert (
                refused(target, credentials(rogue, "stranger", pki["ca"]), call)
                is grpc.StatusCode.UNAVAILABLE
            )
        assert origin.request_log() == stolen_before  # nothing fetched for a stranger
        assert all(m.alive() for m in cluster.members)


class _Silent:
    def on_have(self, parent_id: str, pieces: list[int]) -> None: ...
    def on_piece(self, parent_id: str, number: int, offset: int, data: memoryview, digest: int) -> None: ...
    def on_piece_failed(self, parent_id: str, number: int, reason: str) -> None: ...
    def on_closed(self, parent_id: str, error: Exception | None) -> None: ...


def piece_probe(port: int, context: ssl.SSLContext | None) -> str:
    """Say HELLO for a task nobody holds: "unknown_task" if the piece server answered, else the error."""

    async def ask() -> str:
        try:
            conn = await connect_parent(
                "127.0.0.1", port, task_id="a" * 64, peer_id="probe", piece_length=MiB, content_length=MiB,
                parent_id="x", listener=_Silent(), pool=BufferPool(2 * MiB), connect_timeout_s=5.0,
                ssl_context=context,
            )  # fmt: skip
        except RemoteError as exc:
            return exc.code
        except (OSError, ProtocolError, TimeoutError) as exc:
            return f"refused: {type(exc).__name__}"
        conn.close()
        return "served"

    return asyncio.run(ask())


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_pieces_over_mtls_flow_and_strangers_get_nothing(origin: Origin, tmp_path: Path) -> None:
    """`security.tls.pieces`: the swarm moves pieces over mTLS; plain, anonymous or foreign callers of the
    piece port are refused at the handshake, while a member gets the protocol's own answer."""
    pki = make_pki(tmp_path / "pki", ["member"])
    rogue = make_pki(tmp_path / "rogue", ["stranger"], ca_name="another CA")
    files = {"ca_cert": str(pki["ca"]), "cert": str(pki["member"]), "key": str(pki["member.key"])}
    overrides = {"*": {"security": {"tls": {**files, "pieces": True}}}}
    assert origin.root is not None
    origin.root.mkdir(parents=True, exist_ok=True)
    digest = make_file(origin.root / "f.bin", FILE_BYTES, seed=4)
    with LocalCluster(
        tmp_path / "c", peers=2, daemon_overrides=overrides, scheduler_overrides={"security": {"tls": files}}
    ) as cluster:
        for peer in cluster.peers:
            dfget_ok(peer, origin.url("/f.bin"), tmp_path / peer.name)
            assert file_digest(tmp_path / peer.name).value == digest
        assert origin.bytes_sent <= 1.1 * FILE_BYTES
        uploaded = sum(stats(m)["upload_bytes"] for m in cluster.daemons)
        assert uploaded >= 2 * FILE_BYTES  # both peers got every piece from another daemon, over TLS

        port = cluster.peers[0].ports["piece"]
        member = client_context(pki["ca"], pki["member"], pki["member.key"])
        assert piece_probe(port, member) == "unknown_task"  # a member speaks the protocol over TLS
        assert piece_probe(port, None).startswith("refused")  # plain TCP
        assert piece_probe(port, client_context(pki["ca"])).startswith("refused")  # no certificate
        foreign = client_context(pki["ca"], rogue["stranger"], rogue["stranger.key"])
        assert piece_probe(port, foreign).startswith("refused")  # certificate from another CA
        assert piece_probe(port, member) == "unknown_task"  # and the server is still fine
        assert all(m.alive() for m in cluster.members)


def test_piece_tls_needs_the_certificates() -> None:
    from pydantic import ValidationError

    from dfly.common.tls import TlsSection

    with pytest.raises(ValidationError, match="pieces needs ca_cert, cert and key"):
        TlsSection(pieces=True)
