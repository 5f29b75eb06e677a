"""ParentSet lends the task state what its parents announced (for the piece server's HAVE rule) only
while it downloads: the state outlives the attempt and must not keep its connections alive."""

from types import SimpleNamespace

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
