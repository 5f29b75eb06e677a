"""dfdaemon configuration: YAML via --config, env prefix DFLY_DFDAEMON__ (docs/configuration.md).

Every listener accepts port 0 (the kernel picks; the real port goes to --ready-file).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from dfly.common.config import DecimalInt, IpAddress, IpAddressOrEmpty, LogLevel, StrictModel
from dfly.common.net import dialable_host
from dfly.common.pieces import MiB
from dfly.common.tls import SecuritySection


class HostSection(StrictModel):
    hostname: str = Field(default_factory=socket.gethostname, min_length=1, max_length=255)
    advertise_ip: IpAddressOrEmpty = ""  # "" = the source address the kernel picks toward the first scheduler
    idc: str = Field(default="", max_length=1024)
    location: str = Field(default="", max_length=1024)

    @field_validator("advertise_ip")
    @classmethod
    def _check_reachable(cls, value: str) -> str:
        # it becomes the host's id and the address children dial: one no peer can dial was taken silently
        if value:
            ip = ipaddress.ip_address(value)
            if ip.is_unspecified or ip.is_multicast:
                kind = "a wildcard" if ip.is_unspecified else "a multicast address"
                raise ValueError(f"{value} is {kind}, not an address other hosts can reach this host at")
        return value

    @field_validator("hostname", "idc", "location")
    @classmethod
    def _check_printable(cls, value: str) -> str:
        # they go to the schedulers in protobuf strings (UTF-8) and into the host id: an undecodable
        # byte (read as a lone surrogate) failed the first announce and the stop after it
        if not value.isprintable():
            raise ValueError("must be printable text: no control characters or bytes that are not UTF-8")
        return value


class SchedulerSection(StrictModel):
    addrs: list[str] = ["127.0.0.1:8002"]
    # at least 0.1 s: 1e-6 kept a daemon and its scheduler busy on one core each
    keepalive_interval_s: float = Field(default=5.0, ge=0.1)
    schedule_timeout_s: float = Field(default=30.0, gt=0)  # no usable answer within this: go to the origin

    @field_validator("addrs")
    @classmethod
    def _check_addrs(cls, addrs: list[str]) -> list[str]:
        if not addrs:
            raise ValueError("at least one scheduler address (host:port) is needed")
        for addr in addrs:
            host, sep, port = addr.rpartition(":")
            bracketed = host.startswith("[") and host.endswith("]")
            if (
                not sep
                or not re.fullmatch(r"[0-9]{1,5}", port)
                or not 1 <= int(port) <= 65535
                or not dialable_host(host[1:-1] if bracketed else host, bracketed)  # IPv6: [::1]:8002
            ):
                raise ValueError(f"scheduler address {addr!r} must be host:port (IPv6: [address]:port)")
        if len(set(addrs)) != len(addrs):
            raise ValueError("a scheduler address is listed twice")
        return addrs


def _not_empty(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


class StorageSection(StrictModel):
    dir: Path = Path("/var/lib/dfly/daemon")
    commit_interval_s: float = Field(default=1.0, gt=0)

    _dir_not_empty = field_validator("dir", mode="before")(_not_empty)  # "" would be the working directory


class GcSection(StrictModel):
    """Storage GC (daemon/gc.py; Dragonfly's `gc` section): evict tasks unused for `task_ttl_s`, and the
    least recently used ones while disk usage is at or above the high mark, down to the low mark."""

    interval_s: float = Field(default=900.0, gt=0)
    task_ttl_s: float = Field(default=30 * 86400.0, gt=0)  # Dragonfly's taskTTL: 30 days
    disk_high_threshold_percent: float = Field(default=80.0, gt=0, le=100)
    disk_low_threshold_percent: float = Field(default=60.0, ge=0, lt=100)
    # 0 = usage of the filesystem holding storage.dir (other files on it count); N = usage is dfly's own
    # task bytes out of N bytes (a quota: other files neither trigger nor block eviction).
    disk_quota_bytes: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _marks(self) -> GcSection:
        if self.disk_low_threshold_percent >= self.disk_high_threshold_percent:
            raise ValueError("gc.disk_low_threshold_percent must be below gc.disk_high_threshold_percent")
        return self


class DownloadSection(StrictModel):
    buffer_bytes: int = Field(default=32 * MiB, ge=1 * MiB)  # budget of receive buffers
    max_parents: int = Field(default=8, ge=1, le=20)
    requests_per_parent: int = Field(default=6, ge=1, le=16)
    piece_timeout_s: float = Field(default=30.0, gt=0)
    # Scheduler stream broken and no parent holds a missing piece for this long: read the origin.
    no_parent_timeout_s: float = Field(default=10.0, gt=0)
    progress_report_interval_s: float = Field(default=1.0, gt=0)


MAX_RATE_LIMIT_BYTES_PER_S = 2**53  # bounded as sent to schedulers (a float there)


class UploadSection(StrictModel):
    rate_limit_bytes_per_s: int = Field(default=0, ge=0, le=MAX_RATE_LIMIT_BYTES_PER_S)  # 0 = unlimited
    slots: int = Field(default=200, ge=1, le=1_000_000)
    # A task this daemon reads from the origin: give each piece to one child before any piece twice
    # (daemon/core/first_pass.py); the swarm's source uplink then carries about one copy.
    first_pass: bool = True
    # Seconds between the last piece given out and the release of that rule (see first_pass.py).
    first_pass_hold_s: float = Field(default=1.0, ge=0, le=60)
    # A leech (Dragonfly's upload.disableShared): no piece server; the scheduler never offers this host
    # as a parent. Not allowed on a seed peer.
    disable_shared: bool = False


class ListenerSection(StrictModel):
    ip: IpAddress = "0.0.0.0"
    port: int = Field(ge=0, le=65535)


class ControlSection(ListenerSection):
    port: int = Field(default=4000, ge=0, le=65535)
    # IPs allowed to call DownloadTask; empty = the IPs of scheduler.addrs
    trusted_schedulers: list[IpAddress] = []


class PieceSection(ListenerSection):
    port: int = Field(default=4005, ge=0, le=65535)


class LocalListenerSection(ListenerSection):
    ip: IpAddress = "127.0.0.1"


class HijackHttpsSection(StrictModel):
    # CONNECT targets whose host matches one of these regexes are intercepted: TLS is terminated with a
    # certificate the CA below signs for that host, and the requests inside are served like forward-proxy
    # requests (P2P by `rules`). Other CONNECT targets get a plain tunnel. Empty = intercept nothing.
    hosts: list[str] = []
    # The CA (PEM files) that signs the per-host certificates; both empty = a CA generated on first use
    # and kept as <storage.dir>/proxy-ca.crt and proxy-ca.key. Clients must trust its certificate.
    cert: str = ""
    key: str = ""

    @model_validator(mode="after")
    def _pair(self) -> HijackHttpsSection:
        if bool(self.cert) != bool(self.key):
            raise ValueError("proxy.hijack_https: set both cert and key, or neither")
        return self


class ProxySection(LocalListenerSection):
    port: int = Field(default=4001, ge=0, le=65535)
    enable: bool = True  # the registry mirror on ip:port (127.0.0.1 unless configured)
    # Upstream for mirror requests without X-Dragonfly-Registry or ns= (podman and skopeo send neither),
    # e.g. "https://registry.example.com" or "127.0.0.1:5000"; "" = those requests get 400.
    registry_mirror: str = ""
    # Other upstreams the mirror and the forward proxy may contact (scheme://host[:port]);
    # registry_mirror is always allowed.
    allowed_hosts: list[str] = []
    # Forward proxy: GET URLs matching one of these regexes go through P2P (also any GET carrying
    # X-Dragonfly-Use-P2P: true); the rest is forwarded directly.
    rules: list[str] = ["blobs/sha256.*"]
    # Registries whose blobs anyone may read: served from the swarm without asking the registry first.
    # For every other registry the client's own credentials are checked upstream (HEAD of the blob) before
    # a blob is served from the swarm.
    public_registries: list[str] = []
    # Forward proxy: when set (both or neither), absolute-form requests and CONNECT need
    # `Proxy-Authorization: Basic` with them (else 407). Registry-mirror requests are not covered
    # (their Authorization is the registry's).
    basic_auth_username: str = ""
    basic_auth_password: str = ""
    hijack_https: HijackHttpsSection = HijackHttpsSection()
    # An HTTP connection with no request in progress (idle keep-alive, or a request head that never
    # completes) is closed after this many seconds.
    idle_timeout_s: float = Field(default=60.0, gt=0)
    # A CONNECT tunnel in which no byte moved either way for this long is closed.
    tunnel_idle_timeout_s: float = Field(default=600.0, gt=0)
    # Connections open at once; one more is closed at accept (a client cannot take every descriptor).
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _basic_auth_pair(self) -> ProxySection:
        if bool(self.basic_auth_username) != bool(self.basic_auth_password):
            raise ValueError("basic_auth_username and basic_auth_password are set together or not at all")
        return self

    @model_validator(mode="after")
    def _upstreams_parse(self) -> ProxySection:
        from dfly.daemon.proxy.forward import compile_rules
        from dfly.daemon.proxy.registry import BadRequest, normalize_upstream

        checks: list[tuple[str, list[str]]] = [
            ("registry_mirror", [self.registry_mirror] if self.registry_mirror else []),
            ("allowed_hosts", self.allowed_hosts),
            ("public_registries", self.public_registries),
        ]
        for key, values in checks:  # the message names the key (the error is the section's)
            for value in values:
                try:
                    normalize_upstream(value)
                except BadRequest as exc:
                    raise ValueError(f"{key}: {exc}") from None
        for key, rules in (("rules", self.rules), ("hijack_https.hosts", self.hijack_https.hosts)):
            try:
                compile_rules(rules)
            except BadRequest as exc:
                raise ValueError(f"{key}: {exc}") from None
        return self


class MetricsSection(LocalListenerSection):
    port: int = Field(default=4002, ge=0, le=65535)


class HealthSection(ListenerSection):
    port: int = Field(default=4003, ge=0, le=65535)


class LocalApiSection(StrictModel):
    socket: Path = Path("/run/dfly/dfdaemon.sock")
    mode: int = Field(default=0o660, ge=0, le=0o777)  # permission bits only
    group: str = ""  # "" = the daemon's own group

    _socket_not_empty = field_validator("socket", mode="before")(_not_empty)

    @field_validator("mode", mode="before")
    @classmethod
    def _octal_text(cls, value: object) -> object:
        """A quoted mode ('0660', as in a shell's chmod) is read as octal; YAML reads an unquoted 0660 so.
        An unquoted mode without the leading 0 (440) is refused: YAML reads it as decimal (0670)."""
        if isinstance(value, DecimalInt) and value > 0:
            raise ValueError(
                f"{value} is a decimal number here: write the mode in octal with a leading 0, e.g. 0660"
            )
        if not isinstance(value, str):
            return value
        text = value.strip()
        if re.fullmatch(r"0[oO]?[0-7]{1,4}", text):
            return int(text[2:] if text[1:2] in ("o", "O") else text, 8)
        raise ValueError(f"{value!r} is not an octal mode: write it with a leading 0, e.g. 0660")


class SeedPeerSection(StrictModel):
    enable: bool = False
    # Read origins on loopback (127.0.0.0/8, ::1, names resolving there) when the scheduler asks for
    # another host's download: only right for a cluster on one machine (`dfly up` sets it), where the
    # requester's loopback is the seed's. Else a loopback URL would read the seed host's own services
    # for whoever asked, and the requesting peer reads its own loopback itself.
    loopback_origins: bool = False


class DaemonConfig(StrictModel):
    host: HostSection = HostSection()
    scheduler: SchedulerSection = SchedulerSection()
    storage: StorageSection = StorageSection()
    gc: GcSection = GcSection()
    download: DownloadSection = DownloadSection()
    upload: UploadSection = UploadSection()
    control: ControlSection = ControlSection()
    piece: PieceSection = PieceSection()
    proxy: ProxySection = ProxySection()
    metrics: MetricsSection = MetricsSection()
    health: HealthSection = HealthSection()
    local_api: LocalApiSection = LocalApiSection()
    seed_peer: SeedPeerSection = SeedPeerSection()
    security: SecuritySection = SecuritySection()  # mTLS to schedulers and on the control port
    log_level: LogLevel = "info"

    @model_validator(mode="after")
    def _seed_uploads(self) -> DaemonConfig:
        if self.seed_peer.enable and self.upload.disable_shared:
            raise ValueError("a seed peer must upload: seed_peer.enable excludes upload.disable_shared")
        return self

    @model_validator(mode="after")
    def _advertised_where_pieces_are_served(self) -> DaemonConfig:
        """Children dial host.advertise_ip at the piece port: an IPv6 address for a piece server on IPv4
        only (0.0.0.0, the default, included) was taken, and no child could ever connect."""
        advertise, listen = self.host.advertise_ip, self.piece.ip
        ip = ipaddress.ip_address
        if advertise and ip(advertise).version == 6 and ip(listen).version == 4:
            raise ValueError(
                f"host.advertise_ip {advertise} is IPv6 but piece.ip {listen} serves IPv4 only: "
                "set piece.ip to '::' (every interface) or advertise an IPv4 address"
            )
        return self
