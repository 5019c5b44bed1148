"""The user → mailbox-node map (issue #20, docs/cluster.md): which node holds a user's mailbox.

On one machine nothing is assigned and every user's node is ``None``: the mailbox is local.
In a cluster each user's encrypted mailbox file lives on exactly one mailbox node; front
nodes ask the directory where to take a login or a delivery. The map is two columns of the
``users`` row (so it goes with the user, and a removed user leaves no stale entry), added by
migration 8 in both the SQLite and the PostgreSQL directory.

The API, on :class:`postvern.directory.Directory` (synchronous, thread-safe; call it from a
worker thread, never on the event loop):

``mailbox_node(user_id) -> str | None``
    The node that holds the user's mailbox; None when none is assigned or no such user.
``set_mailbox_node(user_id, node: str | None) -> None``
    Assign (or, with None, unassign) the user's node; the moving flag is left as it is.
    :class:`DirectoryError` when there is no such user or the name is not a node name.
``move_mailbox_node(user_id, from_node: str | None, to_node: str | None) -> bool``
    Compare-and-set: the node becomes ``to_node`` and the moving flag is cleared only if
    the node is still ``from_node``; False otherwise (another node acted first — a
    failover raced a move, say). One transaction.
``users_on_node(node) -> list[User]``
    Every user assigned to ``node``, ordered by domain then local part.
``mailbox_nodes() -> dict[str, int]``
    Each node with users assigned, and how many.
``set_user_moving(user_id, moving: bool) -> None``
    Mark the user as being moved between nodes (front nodes hold new sessions and
    deliveries back while it is set); :class:`DirectoryError` when there is no such user.
``user_moving(user_id) -> bool``
    Whether that mark is set (False for no such user).
``node_state(user_id) -> NodeState | None``
    Node and moving flag in one read; None for no such user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A node is named by its operator (``mbox-1``, ``mail2.example.net:4190``): a host name
# with an optional port is the longest thing it reasonably needs to hold (RFC 1035 §2.3.4
# bounds a name to 255 octets), and printable ASCII without spaces keeps it safe in logs
# and in the ``postvern cluster`` output.
MAX_NODE_NAME = 255
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\[\]-]*$")

# Migration 8, the same text in both dialects: ALTER TABLE … ADD COLUMN is standard SQL.
V8 = """
ALTER TABLE users ADD COLUMN node TEXT;
ALTER TABLE users ADD COLUMN moving INTEGER NOT NULL DEFAULT 0;
CREATE INDEX users_node ON users(node);
"""


@dataclass(frozen=True, slots=True)
class NodeState:
    """Where a user's mailbox is, and whether it is being moved."""

    node: str | None
    moving: bool


def valid_node_name(node: str) -> bool:
    return len(node) <= MAX_NODE_NAME and bool(_NODE_NAME.match(node))
