"""The `/metrics` listener of the daemon and the scheduler (Prometheus text format).

Rules:
- `GET /metrics` answers with the registry's metrics (a query such as `?name[]=x` filters them,
  as prometheus_client does); every other path is 404. prometheus_client's own `start_http_server`
  answers any path with the metrics, so a probe or a scrape config with a wrong path looked healthy.
- One daemon thread accepts, a thread per connection answers (prometheus_client's
  `ThreadingWSGIServer`), at most MAX_CONNECTIONS at once (more are closed at once) and each for at
  most REQUEST_TIMEOUT_S, silent or not: idle or trickling connections held a thread and a descriptor
  each, without end.
  No access log.
- The address family follows the listen address, so `::` and IPv6 addresses bind as such.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

METRICS_PATH = "/metrics"
MAX_CONNECTIONS = 32  # Prometheus scrapes over one connection at a time; a few tools may look too
REQUEST_TIMEOUT_S = 10.0
NOT_FOUND = f"not found: the metrics are at {METRICS_PATH}\n".encode()


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # socket timeout of each connection (StreamRequestHandler.setup)
    lifetime_s = REQUEST_TIMEOUT_S  # and of the whole connection (one request: wsgiref keeps none alive)

    def setup(self) -> None:
        super().setup()
        # A client trickling a byte every few seconds never hit the socket timeout: MAX_CONNECTIONS of
        # them held every slot, and every real scrape was refused.
        self._lifetime = threading.Timer(self.lifetime_s, self._cut)
        self._lifetime.daemon = True
        self._lifetime.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._lifetime.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """No access log line per scrape."""


def metrics_app(registry: CollectorRegistry) -> Any:
    """The WSGI app: the registry at METRICS_PATH, 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response(
                "404 Not Found",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(NOT_FOUND)))],
            )
            return [NOT_FOUND]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


def start_metrics_server(
    ip: str, port: int, registry: CollectorRegistry = REGISTRY
) -> tuple[WSGIServer, threading.Thread]:
    """Listen on ip:port (0: any free port) and serve in a daemon thread; OSError if it cannot bind."""
    family = socket.getaddrinfo(ip, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family
        serving = threading.BoundedSemaphore(MAX_CONNECTIONS)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.serving.acquire(blocking=False):
                self.shutdown_request(request)  # over the cap: closed, no thread
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.serving.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.serving.release()

    server = make_server(ip, port, metrics_app(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
