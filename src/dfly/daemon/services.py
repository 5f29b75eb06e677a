"""The daemon's small network edges: the control gRPC service (4000) and `GET /healthy` (4003).

Rules:
- `DownloadTask` makes this daemon fetch from the origin, so it is accepted only from trusted
  scheduler addresses (config `control.trusted_schedulers`, default the IPs of `scheduler.addrs`);
  anyone else gets PERMISSION_DENIED.
- The health endpoint answers 200 to `GET /healthy` and 404 to anything else; it reads at most one
  small request per connection and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

import grpc

from dfly.api import daemon_pb2 as dpb
from dfly.api import daemon_pb2_grpc as dpb_grpc
from dfly.common.errors import DflyError
from dfly.common.net import listen_socket
from dfly.daemon.task_request import TaskRequest

log = logging.getLogger(__name__)


def peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' / 'ipv6:[::1]:5555' -> the IP."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class ControlService(dpb_grpc.DfdaemonControlServicer):
    def __init__(self, trusted: list[str], trigger: Callable[[TaskRequest], str]) -> None:
        self._trusted = trusted
        self._trigger = trigger

    async def DownloadTask(
        self, request: dpb.DownloadTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> dpb.DownloadTaskResponse:
        caller = peer_ip(context.peer())
        if not any(same_ip(caller, ip) for ip in self._trusted):
            log.warning("refused DownloadTask from untrusted %s", context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{caller or 'caller'} is not a trusted scheduler"
            )
        try:
            task_id = self._trigger(TaskRequest.seed_trigger(request.download))
        except DflyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.task_id and request.task_id != task_id:
            log.warning("scheduler task id %s differs from ours %s", request.task_id[:12], task_id[:12])
        return dpb.DownloadTaskResponse(task_id=task_id, accepted=True)


async def start_health_server(ip: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            ok = line.startswith(b"GET /healthy ")
            body = b"OK" if ok else b"not found"
            status = b"200 OK" if ok else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=listen_socket(ip, port))
