"""A user's own forwarding: outside addresses their mail goes to, with or without a copy kept.

The user sets it in the portal or through the API, within what the administrator allows
(``[accounts] forwarding``, ``max_forwards``). The directory applies it where alias
expansion reaches the user (``Directory._reach_user``), so it composes with aliases, +tags,
catch-alls and role addresses, and forwarded mail leaves through the alias forwarder (SRS,
ARC, DKIM, the durable queue).

Only outside addresses may be targets. An address in a domain we host is refused: a local
destination is what an alias is for, and local forwards could form loops that drop mail
(two users forwarding to each other without keeping copies). If a target's domain becomes
one of ours later, or the administrator turns forwarding off, the forward stops applying
and the mail stays in the mailbox: a forward never makes an accepted message go nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import apsw

# Outside addresses one user may forward to, when the administrator sets no other number:
# enough for a phone and an old account, too few to make the server a mailing list.
DEFAULT_MAX_FORWARDS = 5

V7 = """
-- Per user: outside addresses (a JSON list) their mail is forwarded to, and whether a copy
-- stays in the mailbox as well.
CREATE TABLE forwards(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    targets TEXT NOT NULL,
    keep_copy INTEGER NOT NULL DEFAULT 1,
    updated INTEGER NOT NULL
);
"""


def migrate_v7(conn: apsw.Connection) -> None:
    conn.execute(V7)


@dataclass(frozen=True, slots=True)
class ForwardingPolicy:
    """What the administrator allows users to set for themselves."""

    allowed: bool = True
    max_targets: int = DEFAULT_MAX_FORWARDS


@dataclass(frozen=True, slots=True)
class Forwarding:
    """A user's forwarding as stored; no targets means none."""

    targets: tuple[str, ...] = ()
    keep_copy: bool = True
