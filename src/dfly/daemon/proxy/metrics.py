"""Prometheus counters of the proxy and registry mirror (port 4002, beside the other `dfly_daemon_*`).

Dragonfly's proxy_request_total / _failure_total / _via_dfdaemon_total, by the kind of request:
`mirror` (origin-form: the registry mirror), `forward` (absolute-form, or inside an intercepted
CONNECT), `connect` (the CONNECT itself: tunnelled, intercepted or refused).
- `dfly_daemon_proxy_requests_total{kind}`: every request answered;
- `dfly_daemon_proxy_requests_via_p2p_total{kind}`: answered from a P2P task (`X-Dragonfly-Task-ID`);
- `dfly_daemon_proxy_request_failures_total{kind}`: answered with an error of the daemon's own making
  (`X-Dragonfly-Error-Type` without `X-Dragonfly-Origin-Status`: refused, bad request, upstream
  unreachable, download failed). An upstream's own answer is no failure of the proxy: passed through
  unchanged, or relayed (a registry's 401 to the access check, which starts a client's token flow).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter

_REQUESTS = Counter("dfly_daemon_proxy_requests", "Requests the proxy answered, by kind", ["kind"])
_VIA_P2P = Counter(
    "dfly_daemon_proxy_requests_via_p2p", "Requests answered from a P2P task, by kind", ["kind"]
)
_FAILURES = Counter(
    "dfly_daemon_proxy_request_failures", "Requests answered with the daemon's own error, by kind", ["kind"]
)
KINDS = ("mirror", "forward", "connect")
for _kind in KINDS:  # every series exists from the start (rate() of a missing series is empty)
    _REQUESTS.labels(kind=_kind)
    _VIA_P2P.labels(kind=_kind)
    _FAILURES.labels(kind=_kind)


def count_response(kind: str, response: web.StreamResponse) -> None:
    _REQUESTS.labels(kind=kind).inc()
    if "X-Dragonfly-Task-ID" in response.headers:
        _VIA_P2P.labels(kind=kind).inc()
    if "X-Dragonfly-Error-Type" in response.headers and "X-Dragonfly-Origin-Status" not in response.headers:
        _FAILURES.labels(kind=kind).inc()


def count_connect(failed: bool) -> None:
    _REQUESTS.labels(kind="connect").inc()
    if failed:
        _FAILURES.labels(kind="connect").inc()
