"""The task's file on this host for one download attempt: made, or a held copy confirmed or dropped;
finished durably at the end.

Job: `ensure` is called with the layout and origin headers the attempt learns first (the scheduler's
answer, or this host's own origin stat). A task new here gets its file (inside the disk quota). A copy
held from before (an earlier attempt of this daemon, or one recovered from storage after a restart)
is checked against what the attempt learned before any client or peer is told of it:

Rules:
- `file_ready` is set once the file holds only pieces of the object the attempt downloads; until then
  no local client gets `Started` and the piece server does not serve the task (tasks.py), so bytes of
  a held copy never go out before it is confirmed. A held copy with every piece is confirmed too before
  its attempt completes (conductor.py: by the origin's stat when the scheduler gives no layout).
- A held copy of another layout (the object's length changed) is dropped in place, its records and
  file deleted, and the attempt goes on with the new layout: the request that found it is not failed.
  After `file_ready` the layout is fixed; another one is a `StaleCopy` error (the attempt's object
  changed while it ran) and the task is removed (tasks.py).
- A held copy of the same layout whose validators (ETag, Last-Modified) name another object keeps its
  file: its pieces are forgotten, every record first (one commit), then the new validators are
  recorded, so a restart never takes an old piece for one of the new object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from dfly.common.errors import DflyError, StaleCopy
from dfly.common.ids import redact_url
from dfly.common.validators import same_object
from dfly.daemon.context import DaemonContext
from dfly.daemon.core.task_state import Layout, TaskState
from dfly.daemon.storage import TaskMeta
from dfly.daemon.task_request import TaskRequest

log = logging.getLogger(__name__)


def stale_copy(held: Layout, now: Layout, *, dropping: bool = False) -> StaleCopy:
    """The error (or, `dropping`, the warning) for a held copy whose layout is not the task's now (the
    object changed at the origin, or another layout was chosen for it)."""
    outcome = "the new object is downloaded" if dropping else "download again"
    return StaleCopy(
        f"this host's partial copy has another layout ({held.content_length} bytes in pieces of "
        f"{held.piece_length}, now {now.content_length} in pieces of {now.piece_length}): it is dropped; "
        + outcome
    )


class TaskFile:
    def __init__(self, ctx: DaemonContext, state: TaskState, request: TaskRequest, ready: asyncio.Event):
        self.ctx = ctx
        self.state = state
        self.request = request
        self.ready = ready
        self._durable: asyncio.Future[None] | None = None  # the finish record's group commit
        self._all_pieces_at: float | None = None

    async def ensure(self, layout: Layout, response_headers: Mapping[str, str]) -> None:
        """The file for `layout` of the object these headers describe, ready for pieces and readers."""
        held = self.state.layout
        if held is not None and held != layout:
            if self.ready.is_set():  # the attempt's own object changed under it
                raise stale_copy(held, layout)
            await self.drop_held(layout)
        if self.ready.is_set():
            return
        self.state.set_layout(layout.content_length, layout.piece_length)
        if self.ctx.storage.task_meta(self.state.task_id) is None:
            self.state.response_headers = dict(response_headers)
            meta = TaskMeta(
                task_id=self.state.task_id,
                url=redact_url(self.request.url),  # no user info or query (presigned tokens) at rest
                content_length=layout.content_length,
                piece_length=layout.piece_length,
                response_headers=dict(response_headers),
            )
            async with self.ctx.admit(layout.content_length):
                await self.ctx.storage.create_task(meta)
        elif not same_object(self.state.response_headers, response_headers):
            self.replace_object(response_headers, "the task's object changed since")
        self.ready.set()

    async def drop_held(self, layout: Layout) -> None:
        """A held copy of another layout, not yet confirmed: deleted, the task starts afresh here."""
        held = self.state.layout
        assert held is not None
        log.warning("task %s: %s", self.state.task_id[:12], stale_copy(held, layout, dropping=True))
        self.state.drop_layout()
        self.state.response_headers = {}
        await self.ctx.storage.delete_task(self.state.task_id)

    def replace_object(self, response_headers: Mapping[str, str], why: str) -> None:
        """The held pieces are of another object than the one now read: forgotten, their records first,
        then the validators of the object now read are recorded."""
        task_id = self.state.task_id
        held = self.state.available_pieces()
        if held:
            log.warning("task %s: %s its %d held pieces came; reading it again", task_id[:12], why, len(held))
            self.state.forget_pieces(held)
        # Every record of the task goes first (a commit at once), also those of parents' copies whose
        # writes ended as this read began (never made available). Only then the validators of the object
        # now read, so a restart never takes an old piece for one of it.
        self.ctx.storage.forget_pieces(task_id)
        self.state.response_headers = dict(response_headers)
        self.ctx.storage.set_response_headers(task_id, response_headers)

    def finish(self, now: float) -> None:
        """Every piece is in: the finish record's group commit starts (clients are told before it ends)."""
        self._all_pieces_at = now
        self._durable = asyncio.ensure_future(self.ctx.storage.finish_task(self.state.task_id))
        # its error is logged by `durable`; marked retrieved for the paths that never get there (a cancel
        # at stop, a later finish after a rejected verdict)
        self._durable.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def durable(self, started_at: float) -> None:
        """Wait for the finish record's commit, if the attempt finished; log how long it took."""
        if self._durable is None:
            return
        try:
            await self._durable
        except DflyError as exc:
            log.error("task %s is complete but not durable: %s", self.state.task_id[:12], exc)
            return
        now = asyncio.get_running_loop().time()
        log.info(
            "task %s: all pieces after %.3f s, durable after %.3f s",
            self.state.task_id[:12],
            (self._all_pieces_at or now) - started_at,
            now - started_at,
        )
