"""Scenario helpers for the simulator tests."""

from __future__ import annotations

from typing import Any

from dfly.scheduler.core.config import EngineConfig
from dfly.sim.swarm import TCP_PAYLOAD_FACTOR, SwarmConfig

MIB = 1 << 20


def scenario(hosts: int, mib: float, mbit: float, **overrides: Any) -> SwarmConfig:
    """Every host, the seed and the origin at `mbit` wire rate (payload rate in the model)."""
    rate = mbit * 1e6 / 8 * TCP_PAYLOAD_FACTOR
    fields: dict[str, Any] = {
        "hosts": hosts,
        "file_bytes": round(mib * MIB),
        "host_up": rate,
        "host_down": rate,
        "seed_up": rate,
        "seed_down": rate,
        "origin": rate,
    }
    topology = overrides.pop("topology", None)
    if topology is not None:
        fields["engine"] = EngineConfig(topology=topology)
    fields.update(overrides)
    return SwarmConfig(**fields)
