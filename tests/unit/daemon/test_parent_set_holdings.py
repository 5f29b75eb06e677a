"""ParentSet lends the task state what its parents announced (for the piece server's HAVE rule) only
while it downloads: the state outlives the attempt and must not keep its connections alive."""

import functools
import random
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

from dfly.api import scheduler_pb2 as pb
from dfly.daemon.config import DaemonConfig
from dfly.daemon.core.task_state import TaskState
from dfly.daemon.parents import ParentSet


def test_parent_holdings_are_lent_to_the_state_until_the_parents_close() -> None:
    state = TaskState("t" * 64)
    state.set_layout(4 * 64, 64)
    first = ParentSet(SimpleNamespace(state=state))  # type: ignore[arg-type]
    assert state.parent_has is not None
    assert not state.parent_has("unknown-parent", 0)
    second = ParentSet(SimpleNamespace(state=state))  # type: ignore[arg-type]  # a later attempt
    first.close_all()  # an old attempt ending does not take the new one's away
    assert state.parent_has == second.parent_has
    second.close_all()
    assert state.parent_has is None


def test_no_more_parents_are_taken_than_download_max_parents() -> None:
    """Candidates beyond `download.max_parents` (counting connections still being made) are not
    connected to; one that is this peer itself, or already connecting, never is."""
    state = TaskState("t" * 64)
    state.set_layout(4 * 64, 64)
    config = DaemonConfig.model_validate({"download": {"max_parents": 3}})
    spawned: list[Coroutine[Any, Any, None]] = []

    def spawn(coroutine: Coroutine[Any, Any, None]) -> None:
        spawned.append(coroutine)
        coroutine.close()  # not run: the connection attempt itself is not what this checks

    conductor = SimpleNamespace(
        state=state, ctx=SimpleNamespace(config=config, rng=random.Random(0)), peer_id="me", spawn=spawn
    )
    parents = ParentSet(conductor)  # type: ignore[arg-type]
    candidate = functools.partial(pb.CandidateParent, ip="127.0.0.1", piece_port=1)
    parents.add_candidates([candidate(peer_id="me"), candidate(peer_id="p0"), candidate(peer_id="p0")])
    assert len(spawned) == 1  # p0, once
    parents.add_candidates([candidate(peer_id=f"p{i}") for i in range(6)])
    assert len(spawned) == 3  # p1 and p2: then the limit
    assert len(parents) == 3
