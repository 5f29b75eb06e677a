"""Edges parent → child of a task's swarm, with depth labels that keep a `dag` topology acyclic in O(1).

Invariant (dag): every edge goes from a smaller depth to a larger one, so there is no cycle. A child
without children of its own may take any parents (its depth becomes 1 + their deepest); a child that
feeds others may only take parents shallower than itself. Peers reading the origin or holding the whole
task have no parents and depth 0. In `mesh` topology the same edges are kept (for load accounting) but
not checked: two peers may feed each other different pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dfly.scheduler.core.model import Host, Peer, Task


def would_create_cycle(child: Peer, parent: Peer) -> bool:
    """True when the edge parent → child could close a cycle under the depth invariant."""
    if not child.children:
        return False
    return parent.depth >= child.depth


def drop_parents(child: Peer, task: Task, hosts: Mapping[str, Host]) -> None:
    """Remove the child's in-edges (O(parents))."""
    for parent_id in child.parent_ids:
        parent = task.peers.get(parent_id)
        if parent is None:
            continue
        parent.children.discard(child.peer_id)
        host = hosts.get(parent.host_id)
        if host is not None:
            host.child_edges = max(0, host.child_edges - 1)
    child.parent_ids = ()


def drop_children(parent: Peer, task: Task, hosts: Mapping[str, Host]) -> None:
    """Remove the edges out of a peer that goes away (O(its children)); the children reschedule."""
    host = hosts.get(parent.host_id)
    if host is not None:
        host.child_edges = max(0, host.child_edges - len(parent.children))
    for child_id in parent.children:
        child = task.peers.get(child_id)
        if child is not None:
            child.parent_ids = tuple(pid for pid in child.parent_ids if pid != parent.peer_id)
    parent.children.clear()


def set_parents(child: Peer, parents: Sequence[Peer], task: Task, hosts: Mapping[str, Host]) -> None:
    """Replace the child's in-edges by edges from `parents` and update depth labels and host loads."""
    drop_parents(child, task, hosts)
    for parent in parents:
        parent.children.add(child.peer_id)
        host = hosts.get(parent.host_id)
        if host is not None:
            host.child_edges += 1
    child.parent_ids = tuple(parent.peer_id for parent in parents)
    if parents and not child.children:
        child.depth = 1 + max(parent.depth for parent in parents)


def add_parents(
    child: Peer, parents: Sequence[Peer], task: Task, hosts: Mapping[str, Host], keep: int
) -> None:
    """Put `parents` first among the child's in-edges and keep at most `keep` edges in all."""
    current = [task.peers[parent_id] for parent_id in child.parent_ids if parent_id in task.peers]
    fresh = {parent.peer_id for parent in parents}
    combined = [*parents, *(parent for parent in current if parent.peer_id not in fresh)]
    set_parents(child, combined[:keep], task, hosts)


def make_root(peer: Peer, task: Task, hosts: Mapping[str, Host]) -> None:
    """The peer no longer downloads from parents (reads the origin or holds everything)."""
    drop_parents(peer, task, hosts)
    peer.depth = 0
