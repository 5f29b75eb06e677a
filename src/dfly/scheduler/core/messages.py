"""What goes into and out of the scheduling engine: events (past tense) and commands (imperative).

Rules: every message is a frozen dataclass with slots, holds only immutable values (tuples, not lists or
dicts) and carries no transport object; the service translates proto messages to these and back.
Ids are plain strings (host_id, task_id, peer_id as defined in dfly.common.ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = tuple[tuple[str, str], ...]


# --- values shared by events and commands -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostInfo:
    host_id: str
    hostname: str
    ip: str
    piece_port: int
    control_port: int
    seed: bool = False
    boot_id: str = ""
    idc: str = ""
    location: str = ""
    upload_limit_bytes_per_s: int = 0  # 0 = unlimited
    upload_slots: int = 0  # 0 = not reported


@dataclass(frozen=True, slots=True)
class DownloadSpec:
    """What a peer downloads; the same fields made its task id."""

    url: str
    tag: str = ""
    application: str = ""
    filtered_query_params: tuple[str, ...] = ()
    request_headers: Headers = ()
    piece_length: int = 0  # user-fixed, 0 = rule
    disable_back_to_source: bool = False
    timeout_s: float = 0.0
    need_back_to_source: bool = False  # set on a seed trigger
    allowed_origins: tuple[str, ...] = ()  # origins the seed's origin reader may contact (empty = any)


@dataclass(frozen=True, slots=True)
class TaskLayout:
    """A task's piece layout, fixed by its first back-to-source peer."""

    content_length: int
    piece_length: int
    response_headers: Headers = ()


@dataclass(frozen=True, slots=True)
class SourceErrorInfo:
    """The origin's refusal (HTTP status, 0 when there was no response)."""

    status_code: int
    message: str
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class FinishedPiece:
    number: int
    digest: int  # CRC-32
    parent_id: str = ""  # empty when read from the origin
    cost_s: float = 0.0  # the child's time from request to verified piece (0: not measured)


@dataclass(frozen=True, slots=True)
class FinishedTask:
    """A task a host holds completely (sent when it announces, so it is a parent again)."""

    task_id: str
    peer_id: str
    content_length: int
    piece_length: int
    piece_digests: tuple[int, ...] = ()
    url: str = ""  # shown only: without user info or query, never a download spec


@dataclass(frozen=True, slots=True)
class CandidateParent:
    peer_id: str
    host_id: str
    ip: str
    piece_port: int
    seed: bool


# --- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostAnnounced:
    host: HostInfo
    finished_tasks: tuple[FinishedTask, ...] = ()


@dataclass(frozen=True, slots=True)
class HostKeepAlive:
    host_id: str
    boot_id: str
    upload_rate_bytes_per_s: float
    upload_slots_in_use: int


@dataclass(frozen=True, slots=True)
class HostDisconnected:
    """The host's keepalive stream dropped (boot_id "" = whichever boot is current)."""

    host_id: str
    boot_id: str = ""


@dataclass(frozen=True, slots=True)
class HostLeft:
    host_id: str


@dataclass(frozen=True, slots=True)
class TaskDeleted:
    """The host no longer holds the task (its storage GC or a failed digest removed it)."""

    host_id: str
    task_id: str


@dataclass(frozen=True, slots=True)
class PeerRegistered:
    peer_id: str
    host_id: str
    task_id: str
    download: DownloadSpec


@dataclass(frozen=True, slots=True)
class PeerStarted:
    """The child reached its first parent and downloads from it (RECEIVED → RUNNING)."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class BackToSourceStarted:
    peer_id: str
    content_length: int
    piece_length: int
    response_headers: Headers = ()


@dataclass(frozen=True, slots=True)
class PiecesFinished:
    peer_id: str
    pieces: tuple[FinishedPiece, ...]


@dataclass(frozen=True, slots=True)
class PeerFinished:
    peer_id: str
    piece_digests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PeerFailed:
    peer_id: str
    description: str
    source_error: SourceErrorInfo | None = None
    back_to_source: bool = False


@dataclass(frozen=True, slots=True)
class RescheduleRequested:
    """The child has no working parent left, or (more_parents) still has some and wants more."""

    peer_id: str
    blocked: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()
    description: str = ""
    more_parents: bool = False
    corrupt: tuple[str, ...] = ()  # parents that sent a piece failing its CRC-32 (also blocked)


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """The peer's AnnouncePeer stream closed before it finished or failed."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class SeedTriggerFailed:
    """The seed did not take the task: it refused it, or could not be reached (`unreachable`: no answer
    in time, no connection), and then its host is suspended like an unreachable parent's."""

    task_id: str
    seed_host_id: str
    description: str
    unreachable: bool = False


Event = (
    HostAnnounced
    | HostKeepAlive
    | HostDisconnected
    | HostLeft
    | TaskDeleted
    | PeerRegistered
    | PeerStarted
    | BackToSourceStarted
    | PiecesFinished
    | PeerFinished
    | PeerFailed
    | RescheduleRequested
    | PeerLeft
    | SeedTriggerFailed
)


# --- commands -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCandidateParents:
    peer_id: str
    layout: TaskLayout
    parents: tuple[CandidateParent, ...]


@dataclass(frozen=True, slots=True)
class SendBackToSource:
    peer_id: str
    description: str
    layout: TaskLayout | None = None


@dataclass(frozen=True, slots=True)
class SendTaskFailed:
    """Ends the peer's attempt; the service closes its stream after this message."""

    peer_id: str
    description: str
    source_error: SourceErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class SendFinishVerdict:
    peer_id: str
    accepted: bool
    bad_pieces: tuple[int, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TriggerSeedPeer:
    task_id: str
    seed_host_id: str
    seed_ip: str
    seed_control_port: int
    download: DownloadSpec


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """End the peer's stream with an error (unknown host, host left, ...)."""

    peer_id: str
    reason: str


Command = (
    SendCandidateParents | SendBackToSource | SendTaskFailed | SendFinishVerdict | TriggerSeedPeer | ClosePeer
)
