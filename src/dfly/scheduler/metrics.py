"""Prometheus metrics of the scheduler (prefix `dfly_scheduler_`), counted at the service edge.

The engine stays pure: the service shows every event it feeds in and every command it carries out to
`SchedulerMetrics`, which counts them. Each instance owns its registry, so several schedulers (tests)
can live in one process; app.py serves that registry on the metrics port.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dfly.scheduler.core.messages import (
    Command,
    Event,
    HostAnnounced,
    PeerRegistered,
    PiecesFinished,
    SeedTriggerFailed,
    SendBackToSource,
    SendCandidateParents,
    SendFinishVerdict,
    SendTaskFailed,
    TriggerSeedPeer,
)


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.host_announces = Counter("dfly_scheduler_host_announces", "AnnounceHost calls.", registry=r)
        self.registered_peers = Counter("dfly_scheduler_registered_peers", "Peers registered.", registry=r)
        self.candidate_parents = Counter(
            "dfly_scheduler_candidate_parents_sent", "Candidate-parent answers sent.", registry=r
        )
        self.back_to_source = Counter(
            "dfly_scheduler_back_to_source_decisions", "Peers told to read the origin.", registry=r
        )
        self.seed_triggers = Counter(
            "dfly_scheduler_seed_triggers", "Seed-peer triggers by result.", ["result"], registry=r
        )
        self.task_failures = Counter(
            "dfly_scheduler_task_failures", "Failed answers sent to peers, by cause.", ["cause"], registry=r
        )
        self.finish_verdicts = Counter(
            "dfly_scheduler_finish_verdicts", "Finish verdicts sent, by result.", ["accepted"], registry=r
        )
        self.piece_costs = Histogram(
            "dfly_scheduler_piece_cost_seconds",
            "Piece costs children report (request sent to piece verified), from parents only.",
            buckets=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
            registry=r,
        )
        self.peer_streams = Gauge("dfly_scheduler_peer_streams", "Open AnnouncePeer streams.", registry=r)
        self.hosts = Gauge(
            "dfly_scheduler_hosts",
            "Hosts known to the scheduler (disconnected ones too, until scheduling.host_ttl_s).",
            registry=r,
        )
        self.hosts_connected = Gauge(
            "dfly_scheduler_hosts_connected",
            "Hosts whose keepalive stream is up and not silent: the ones offered as parents.",
            registry=r,
        )
        self.tasks = Gauge("dfly_scheduler_tasks", "Tasks known to the scheduler.", registry=r)
        # Every labelled series exists from the start at 0, so rate() and ratios show 0, not nothing.
        for result in ("sent", "failed"):
            self.seed_triggers.labels(result=result)
        for cause in ("origin", "scheduling"):
            self.task_failures.labels(cause=cause)
        for accepted in ("true", "false"):
            self.finish_verdicts.labels(accepted=accepted)

    def track_sizes(
        self, hosts: Callable[[], int], tasks: Callable[[], int], connected: Callable[[], int] = lambda: 0
    ) -> None:
        self.hosts.set_function(lambda: float(hosts()))
        self.hosts_connected.set_function(lambda: float(connected()))
        self.tasks.set_function(lambda: float(tasks()))

    def observe_event(self, event: Event) -> None:
        match event:
            case HostAnnounced():
                self.host_announces.inc()
            case PeerRegistered():
                self.registered_peers.inc()
            case SeedTriggerFailed():
                self.seed_triggers.labels(result="failed").inc()
            case PiecesFinished():
                for piece in event.pieces:
                    if piece.cost_s > 0:
                        self.piece_costs.observe(piece.cost_s)

    def observe_command(self, command: Command) -> None:
        match command:
            case SendCandidateParents():
                self.candidate_parents.inc()
            case SendBackToSource():
                self.back_to_source.inc()
            case TriggerSeedPeer():
                self.seed_triggers.labels(result="sent").inc()
            case SendTaskFailed():
                cause = "origin" if command.source_error is not None else "scheduling"
                self.task_failures.labels(cause=cause).inc()
            case SendFinishVerdict():
                self.finish_verdicts.labels(accepted=str(command.accepted).lower()).inc()
