"""Translation between scheduler.proto messages and the engine's events, commands and views.

Rules: pure functions, no I/O; maps become sorted tuples of pairs (the engine keeps immutable values);
a missing optional message (SourceError) becomes None; the service checks ids and message order before
calling these. Layouts and piece lengths from peers are checked here (`validate_layout`,
`validate_user_piece_length`; UsageError, which the service answers with INVALID_ARGUMENT); a finished
task with an impossible layout in a host announce is dropped, not the whole announce.
"""

from __future__ import annotations

from collections.abc import Mapping

from dfly.api import daemon_pb2
from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import UsageError
from dfly.common.pieces import validate_layout, validate_user_piece_length
from dfly.scheduler.core.cluster import TaskView
from dfly.scheduler.core.messages import (
    BackToSourceStarted,
    Command,
    DownloadSpec,
    Event,
    FinishedPiece,
    FinishedTask,
    Headers,
    HostAnnounced,
    HostInfo,
    PeerFailed,
    PeerFinished,
    PeerStarted,
    PiecesFinished,
    RescheduleRequested,
    SendBackToSource,
    SendCandidateParents,
    SendFinishVerdict,
    SendTaskFailed,
    SourceErrorInfo,
    TaskLayout,
    TriggerSeedPeer,
)


def headers_of(mapping: Mapping[str, str]) -> Headers:
    return tuple(sorted(mapping.items()))


def host_announced(request: pb.AnnounceHostRequest) -> HostAnnounced:
    host = request.host
    info = HostInfo(
        host_id=host.host_id,
        hostname=host.hostname,
        ip=host.ip,
        piece_port=host.piece_port,
        control_port=host.control_port,
        seed=host.seed,
        boot_id=host.boot_id,
        idc=host.idc,
        location=host.location,
        upload_limit_bytes_per_s=host.upload_limit_bytes_per_s,
        upload_slots=host.upload_slots,
    )
    finished = tuple(
        FinishedTask(
            task_id=task.task_id,
            peer_id=task.peer_id,
            content_length=task.content_length,
            piece_length=task.piece_length,
            piece_digests=tuple(task.piece_digests),
            url=task.url,
        )
        for task in request.finished_tasks
        if _valid_layout(task.content_length, task.piece_length)
        # a host speaks for its own peers only: another host's peer id would move that peer here
        and task.peer_id.startswith(f"{host.host_id}-")
    )
    return HostAnnounced(info, finished)


def _valid_layout(content_length: int, piece_length: int) -> bool:
    try:
        validate_layout(content_length, piece_length)
    except UsageError:
        return False
    return True


def download_spec(download: pb.Download) -> DownloadSpec:
    if download.piece_length:
        validate_user_piece_length(download.piece_length)
    return DownloadSpec(
        url=download.url,
        tag=download.tag,
        application=download.application,
        filtered_query_params=tuple(download.filtered_query_params),
        request_headers=headers_of(download.request_headers),
        piece_length=download.piece_length,
        disable_back_to_source=download.disable_back_to_source,
        timeout_s=download.timeout_s,
        need_back_to_source=download.need_back_to_source,
        allowed_origins=tuple(download.allowed_origins),
    )


def download_message(spec: DownloadSpec) -> pb.Download:
    return pb.Download(
        url=spec.url,
        tag=spec.tag,
        application=spec.application,
        filtered_query_params=list(spec.filtered_query_params),
        request_headers=dict(spec.request_headers),
        piece_length=spec.piece_length,
        disable_back_to_source=spec.disable_back_to_source,
        timeout_s=spec.timeout_s,
        need_back_to_source=spec.need_back_to_source,
        allowed_origins=list(spec.allowed_origins),
    )


def peer_event(request: pb.AnnouncePeerRequest, peer_id: str) -> Event | None:
    """The event for an announce after register; None for `register` or an empty oneof."""
    kind = request.WhichOneof("request")
    if kind == "started":
        return PeerStarted(peer_id)
    if kind == "back_to_source_started":
        started = request.back_to_source_started
        validate_layout(started.content_length, started.piece_length)
        return BackToSourceStarted(
            peer_id, started.content_length, started.piece_length, headers_of(started.response_headers)
        )
    if kind == "pieces_finished":
        pieces = tuple(
            FinishedPiece(piece.number, piece.digest, piece.parent_id, piece.cost_ms / 1000.0)
            for piece in request.pieces_finished.pieces
        )
        return PiecesFinished(peer_id, pieces)
    if kind == "finished":
        return PeerFinished(peer_id, tuple(request.finished.piece_digests))
    if kind == "failed":
        failed = request.failed
        source_error = None
        if failed.HasField("source_error"):
            error = failed.source_error
            source_error = SourceErrorInfo(error.status_code, error.message, headers_of(error.headers))
        return PeerFailed(peer_id, failed.description, source_error, failed.back_to_source)
    if kind == "reschedule":
        reschedule = request.reschedule
        return RescheduleRequested(
            peer_id,
            tuple(reschedule.blocked_parents),
            tuple(reschedule.unreachable_parents),
            reschedule.description,
            reschedule.more_parents,
            tuple(reschedule.corrupt_parents),
        )
    return None


def layout_message(layout: TaskLayout) -> pb.TaskLayout:
    return pb.TaskLayout(
        content_length=layout.content_length,
        piece_length=layout.piece_length,
        response_headers=dict(layout.response_headers),
    )


def source_error_message(error: SourceErrorInfo) -> pb.SourceError:
    return pb.SourceError(status_code=error.status_code, message=error.message, headers=dict(error.headers))


def peer_response(command: Command) -> pb.AnnouncePeerResponse | None:
    """The stream message for a command addressed to a peer; None for other commands."""
    match command:
        case SendCandidateParents():
            parents = [
                pb.CandidateParent(
                    peer_id=parent.peer_id,
                    host_id=parent.host_id,
                    ip=parent.ip,
                    piece_port=parent.piece_port,
                    seed=parent.seed,
                )
                for parent in command.parents
            ]
            candidates = pb.CandidateParents(layout=layout_message(command.layout), parents=parents)
            return pb.AnnouncePeerResponse(candidate_parents=candidates)
        case SendBackToSource():
            need = pb.NeedBackToSource(description=command.description)
            if command.layout is not None:
                need.layout.CopyFrom(layout_message(command.layout))
            return pb.AnnouncePeerResponse(need_back_to_source=need)
        case SendTaskFailed():
            failed = pb.TaskFailed(description=command.description)
            if command.source_error is not None:
                failed.source_error.CopyFrom(source_error_message(command.source_error))
            return pb.AnnouncePeerResponse(failed=failed)
        case SendFinishVerdict():
            verdict = pb.FinishVerdict(accepted=command.accepted, bad_pieces=list(command.bad_pieces))
            return pb.AnnouncePeerResponse(finish_verdict=verdict)
    return None


def download_task_request(command: TriggerSeedPeer) -> daemon_pb2.DownloadTaskRequest:
    return daemon_pb2.DownloadTaskRequest(
        task_id=command.task_id, download=download_message(command.download)
    )


def task_stat(view: TaskView) -> pb.TaskStat:
    return pb.TaskStat(
        task_id=view.task_id,
        state=view.state,
        content_length=view.content_length,
        piece_length=view.piece_length,
        peer_count=view.peer_count,
        piece_digests=list(view.piece_digests),
        known_digests=view.known_digests,
    )
