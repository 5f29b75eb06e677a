"""The standard gRPC health service (`grpc.health.v1.Health`) on a dfly gRPC server.

Kubernetes' gRPC probes, `grpc_health_probe` and gRPC load balancers ask it; Dragonfly serves it on the
scheduler's and the daemons' gRPC ports, so their probes carry over.

Rules: the overall status (service "") and each named service are SERVING from `start` until
`shutdown`; from then on NOT_SERVING for good, so a probe or balancer stops sending work before the
listener closes. A name the server does not serve gets NOT_FOUND from Check and SERVICE_UNKNOWN from
Watch (the protocol's answers). The servicer is grpcio's own reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

OVERALL = ""


class GrpcHealth:
    """Health of one gRPC server: attach before the server starts, `start` once it serves."""

    def __init__(self, server: aio.Server, services: Sequence[str]) -> None:
        self._servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # its asyncio flavour
        self._services = (OVERALL, *services)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        for name in self._services:
            await self._servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self) -> None:
        """Every service NOT_SERVING, for good (Watch streams hear it at once)."""
        await self._servicer.enter_graceful_shutdown()
