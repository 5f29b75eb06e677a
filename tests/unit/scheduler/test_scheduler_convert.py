"""Layouts and piece lengths arriving from peers are checked when converted (scheduler/convert.py)."""

from __future__ import annotations

import pytest

from dfly.api import scheduler_pb2 as pb
from dfly.common.errors import UsageError
from dfly.scheduler import convert
from dfly.scheduler.core.messages import FinishedPiece, PiecesFinished


def finished(task_id: str, content_length: int, piece_length: int, host_id: str = "h") -> pb.FinishedTask:
    return pb.FinishedTask(
        task_id=task_id,
        peer_id=f"{host_id}-{task_id}",
        content_length=content_length,
        piece_length=piece_length,
    )


def test_host_announce_drops_only_the_finished_tasks_with_impossible_layouts() -> None:
    request = pb.AnnounceHostRequest(
        host=pb.HostInfo(host_id="h", ip="127.0.0.1"),
        finished_tasks=[finished("good", 1 << 20, 1 << 18), finished("odd", 1 << 20, 1000)],
    )
    event = convert.host_announced(request)
    assert [task.task_id for task in event.finished_tasks] == ["good"]


def test_host_announce_drops_the_finished_tasks_of_other_hosts_peers() -> None:
    """A host may not list another host's peer: the scheduler would move that peer (a parent children
    trust) to the announcing host."""
    request = pb.AnnounceHostRequest(
        host=pb.HostInfo(host_id="h", ip="127.0.0.1"),
        finished_tasks=[
            finished("mine", 1 << 20, 1 << 18),
            finished("theirs", 1 << 20, 1 << 18, host_id="other"),
        ],
    )
    assert [task.task_id for task in convert.host_announced(request).finished_tasks] == ["mine"]


def test_register_with_a_piece_length_that_is_not_a_power_of_two_is_refused() -> None:
    with pytest.raises(UsageError):
        convert.download_spec(pb.Download(url="http://h/f", piece_length=3 << 16))
    assert convert.download_spec(pb.Download(url="http://h/f", piece_length=1 << 16)).piece_length == 1 << 16


def test_back_to_source_started_with_an_impossible_layout_is_refused() -> None:
    started = pb.BackToSourceStarted(content_length=-5, piece_length=1 << 20)
    with pytest.raises(UsageError):
        convert.peer_event(pb.AnnouncePeerRequest(back_to_source_started=started), "p")


def test_piece_costs_arrive_in_seconds() -> None:
    done = pb.PiecesFinished(pieces=[pb.PieceDone(number=3, digest=9, parent_id="par", cost_ms=1250)])
    event = convert.peer_event(pb.AnnouncePeerRequest(pieces_finished=done), "p")
    assert isinstance(event, PiecesFinished)
    assert event.pieces == (FinishedPiece(3, 9, "par", 1.25),)
