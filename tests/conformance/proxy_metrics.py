"""Read a daemon's proxy counters from its Prometheus endpoint (metrics port, `/metrics`)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from dfly.cluster import Member


def proxy_counts(member: Member) -> dict[tuple[str, str], float]:
    """{(series without `dfly_daemon_proxy_` and `_total`, kind): value} of the daemon's proxy counters."""
    url = f"http://127.0.0.1:{member.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("dfly_daemon_proxy_") and sample.name.endswith("_total"):
                name = sample.name.removeprefix("dfly_daemon_proxy_").removesuffix("_total")
                counts[(name, sample.labels["kind"])] = sample.value
    return counts
