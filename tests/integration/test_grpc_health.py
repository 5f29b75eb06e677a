"""The standard gRPC health service on the scheduler's port and the daemons' control port, as
Kubernetes' gRPC probes and `grpc_health_probe` ask it (grpcio's own health client stub here): SERVING
while up, NOT_FOUND for a service the port does not serve, and NOT_SERVING as soon as a stop begins."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dfly.cluster import LocalCluster, Member

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(port: int, service: str) -> tuple[int | None, grpc.StatusCode | None]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        except grpc.RpcError as exc:
            return None, exc.code()
        return reply.status, None


def test_scheduler_and_daemon_ports_answer_health_checks(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        scheduler_port = cluster.scheduler.ports["grpc"]
        control_port = cluster.member("peer-1").ports["control"]
        for port, name in ((scheduler_port, "dfly.scheduler.v1.Scheduler"),
                           (control_port, "dfly.daemon.v1.DfdaemonControl")):  # fmt: skip
            assert check(port, "") == (SERVING, None)
            assert check(port, name) == (SERVING, None)
            assert check(port, "grpc.health.v1.Nope") == (None, grpc.StatusCode.NOT_FOUND)


def watch_until_closed(member: Member, port: int, statuses: list[int], first: threading.Event) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        try:
            for reply in stream:
                statuses.append(reply.status)
                first.set()
        except grpc.RpcError:
            pass  # the server went away: the statuses heard before are what counts


@pytest.mark.parametrize("name", ["scheduler", "peer-1"])
def test_a_stopping_server_says_not_serving_before_it_goes(tmp_path: Path, name: str) -> None:
    with LocalCluster(tmp_path / "c", peers=1) as cluster:
        member = cluster.member(name)
        port = member.ports["grpc" if name == "scheduler" else "control"]
        statuses: list[int] = []
        first = threading.Event()
        watcher = threading.Thread(target=watch_until_closed, args=(member, port, statuses, first))
        watcher.start()
        try:
            assert first.wait(10), "no first status from Watch"
            assert cluster.stop_member(name) == 0
        finally:
            watcher.join(35)
        assert statuses == [SERVING, NOT_SERVING]
