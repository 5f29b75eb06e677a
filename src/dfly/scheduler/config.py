"""`dfly scheduler` configuration (YAML via --config, env prefix DFLY_SCHEDULER__).

Every listener accepts port 0 (the kernel picks; the real port goes to --ready-file).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from dfly.common.config import IpAddress, LogLevel, StrictModel, load_config
from dfly.common.tls import SecuritySection
from dfly.scheduler.core.config import EngineConfig

ENV_PREFIX = "DFLY_SCHEDULER"


class MetricsSection(StrictModel):
    ip: IpAddress = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    enable: bool = True


class SeedTriggerSection(StrictModel):
    timeout_s: float = Field(default=10.0, gt=0, le=3600)  # DownloadTask call on a seed peer's control port


class SchedulerConfig(StrictModel):
    listen_ip: IpAddress = "0.0.0.0"
    port: int = Field(default=8002, ge=0, le=65535)
    metrics: MetricsSection = MetricsSection()
    scheduling: EngineConfig = EngineConfig()
    seed_trigger: SeedTriggerSection = SeedTriggerSection()
    # Largest gRPC message accepted (a host announce carries up to 1 MiB of the tasks it holds, with a
    # CRC per piece); larger ones are refused with RESOURCE_EXHAUSTED before they are parsed. gRPC's int
    # at most; at least twice the daemons' 1 MiB announce chunks.
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=2 * 1024 * 1024, le=2**31 - 1)
    # A host that announced but opened no keepalive stream within this is treated as gone (a daemon opens
    # it at once): an announce alone does not keep a host and the tasks it claims offered.
    keepalive_wait_s: float = Field(default=60.0, gt=0, le=86400)
    # An HTTP/2 ping after this long without a frame from a daemon, answered within half of it: a daemon
    # gone without closing its connection (node lost, link cut, process stopped) has its streams ended,
    # so its downloads leave and its host is suspended, instead of after TCP's ~2 h.
    grpc_keepalive_s: float = Field(default=20.0, ge=1, le=3600)
    security: SecuritySection = SecuritySection()  # mTLS to daemons (common/tls.py)
    log_level: LogLevel = "info"

    @model_validator(mode="after")
    def _seed_waits_agree(self) -> SchedulerConfig:
        """A seed's registration is awaited only after its trigger call may have ended: else a seed still
        accepting the task counts as failed for it."""
        register, trigger = self.scheduling.seed_register_timeout_s, self.seed_trigger.timeout_s
        if register <= trigger:
            raise ValueError(
                f"scheduling.seed_register_timeout_s ({register:g}) must be above seed_trigger.timeout_s "
                f"({trigger:g})"
            )
        return self


def load_scheduler_config(path: str | Path | None, environ: dict[str, str] | None = None) -> SchedulerConfig:
    return load_config(SchedulerConfig, path, ENV_PREFIX, environ)
