"""Which mailbox node owns a user: the directory's map, or rendezvous hashing until it has one.

A user's mailbox is one SQLite file with one writer, so exactly one node owns it. The
directory's user → node map says which (``Directory.mailbox_node``, SQLite or PostgreSQL).
A user with no entry yet is placed by rendezvous (highest-random-weight) hashing of the user
id over the mailbox nodes: every front computes the same node without asking the others. The
choice is then written to the map, so it stays put when nodes come and go. Blocking (the
directory): call from a worker thread.
"""

from __future__ import annotations

import hashlib

from postvern.cluster.nodes import ClusterError, Node, mailbox_nodes
from postvern.directory.db import Directory


class UserGone(ClusterError):
    """The user no longer exists: nothing for them can be placed or delivered."""


def rendezvous(user_id: str, candidates: list[Node]) -> Node:
    """The candidate with the highest hash of (node, user): stable, and even in expectation."""
    if not candidates:
        raise ClusterError("the cluster has no mailbox node (nodes.toml)")

    def weight(node: Node) -> bytes:
        return hashlib.sha256(f"{node.name}\0{user_id}".encode()).digest()

    return max(candidates, key=weight)


class Placement:
    def __init__(self, directory: Directory, nodes: dict[str, Node]) -> None:
        self.directory = directory
        self.nodes = nodes

    def node_for(self, user_id: str) -> Node:
        """The node that owns ``user_id`` now (recording a first placement)."""
        name = self.directory.mailbox_node(user_id)
        if name is None:
            chosen = rendezvous(user_id, mailbox_nodes(self.nodes))
            # Compare-and-set: of two fronts placing one user at once, one write wins and
            # the other reads it back (they chose the same node anyway, unless nodes.toml
            # differs between them).
            if self.directory.move_mailbox_node(user_id, None, chosen.name):
                return chosen
            name = self.directory.mailbox_node(user_id)
            if name is None:
                raise UserGone("the user no longer exists")
        placed = self.nodes.get(name)
        if placed is None or placed.role != "mailbox":
            raise ClusterError(f"the directory places a user on {name!r}, not a mailbox node")
        return placed
