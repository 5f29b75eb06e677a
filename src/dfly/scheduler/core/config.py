"""Tunables of the pure scheduling engine (the `scheduling:` section of the scheduler config).

Defaults follow Dragonfly's current scheduler (dragonfly.md §3.4–3.6) except where DESIGN §4 says
otherwise (back_to_source_limit 1 besides seeds). Durations are float seconds (`_s`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dfly.common.config import StrictModel


class EvaluatorWeights(StrictModel):
    """Named weights of a parent's score; each feature score is in [0, 1], so is the weighted sum."""

    load: float = Field(default=0.6, ge=0)
    idc: float = Field(default=0.2, ge=0)
    location: float = Field(default=0.1, ge=0)
    host_type: float = Field(default=0.1, ge=0)

    @model_validator(mode="after")
    def _check_sum(self) -> EvaluatorWeights:
        if self.load + self.idc + self.location + self.host_type <= 0:
            raise ValueError("at least one evaluator weight must be positive")
        return self


class EngineConfig(StrictModel):
    candidate_parent_limit: int = Field(default=5, ge=1, le=20)  # parents handed out per answer
    filter_parent_limit: int = Field(default=15, ge=1, le=1000)  # candidates sampled per attempt
    retry_limit: int = Field(default=5, ge=1)  # failed attempts before "no parent available"
    retry_back_to_source_limit: int = Field(default=4, ge=1)  # failed attempts before the origin
    retry_interval_s: float = Field(default=0.5, gt=0)  # fallback retry; events schedule sooner
    back_to_source_limit: int = Field(default=1, ge=0)  # concurrent origin readers per task, seeds aside
    seed_failure_ttl_s: float = Field(default=1800.0, ge=0)  # a failed seed is not retried for a task
    # Children wait this long, uncounted, for a triggered seed or an origin reader to fix the layout.
    source_start_timeout_s: float = Field(default=10.0, ge=0)
    # After a (re)start, hosts re-announce within their keepalive backoff (at most 5 s) and running
    # downloads register again: until then a peer is not sent to the origin for want of a seed host or
    # an origin reader; it waits, uncounted (else a scheduler restart sends new peers to the origin).
    startup_grace_s: float = Field(default=6.0, ge=0)
    # A task's origin reader that is gone is replaced by a running peer only after this long: a reader
    # whose stream merely broke registers again within it and goes on reading (no second origin copy).
    source_return_s: float = Field(default=3.0, ge=0)
    # A host whose keepalive stream stays open but sends nothing this long (daemons send every 5 s) is
    # handled as disconnected until its next keepalive: a hung daemon is not offered as a parent.
    host_silence_s: float = Field(default=30.0, gt=0)
    # A host disconnected this long is forgotten with its peers (Dragonfly's hostTTL): a node that is gone
    # for good (a crash sends no LeaveHost) leaves no state behind.
    host_ttl_s: float = Field(default=3600.0, gt=0)
    # A triggered seed that accepted the task but has not registered for it within this (it crashed, or
    # registered with another scheduler) counts as failed for the task; above seed_trigger.timeout_s.
    seed_register_timeout_s: float = Field(default=20.0, gt=0)
    unreachable_reports: int = Field(default=2, ge=1)  # distinct children reporting a host unreachable
    unreachable_suspend_s: float = Field(default=60.0, gt=0)  # how long such a host is not offered
    corrupt_reports: int = Field(default=2, ge=1)  # distinct children that got a bad piece from a host
    corrupt_suspend_s: float = Field(default=600.0, gt=0)  # how long such a host is not offered
    # A peer that just got its first pieces is offered to this many children that have fewer parents
    # than candidate_parent_limit (sampled; O(1) per event, never O(peers of the task)).
    push_fanout: int = Field(default=4, ge=0, le=100)
    topology: Literal["mesh", "dag"] = "mesh"
    weights: EvaluatorWeights = EvaluatorWeights()
