"""One-time invitation links: the administrator creates a user's place, the user sets the
password themselves, so the administrator never knows it (zero-access from the first day).

The link carries 256 random bits; the directory keeps their keyed hash, the address and the
quota. Using the link creates the user (key slots, mailbox, recovery key) and deletes it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from postvern.accounts.store import AccountStore, now

TOKEN_BYTES = 32
VALID_SECONDS = 7 * 86400  # a week to accept, as most invitations go


@dataclass(frozen=True, slots=True)
class Invitation:
    address: str
    quota: int
    expires: int


class Invitations:
    def __init__(self, store: AccountStore, key: bytes) -> None:
        self.store = store
        self._key = key

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    def create(self, address: str, quota: int) -> str:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self.store.tx() as c:
            c.execute("DELETE FROM invitations WHERE address=? OR expires<?", (address, now()))
            c.execute(
                "INSERT INTO invitations(digest, address, quota, expires) VALUES(?, ?, ?, ?)",
                (self._digest(token), address, quota, now() + VALID_SECONDS),
            )
        return token

    def find(self, token: str) -> Invitation | None:
        if len(token) > 100:
            return None
        rows = self.store.rows(
            "SELECT address, quota, expires FROM invitations WHERE digest=? AND expires>=?",
            (self._digest(token), now()),
        )
        return Invitation(str(rows[0][0]), int(rows[0][1]), int(rows[0][2])) if rows else None

    def consume(self, token: str) -> bool:
        return (
            self.store.execute("DELETE FROM invitations WHERE digest=?", (self._digest(token),))
            == 1
        )

    def pending(self) -> list[Invitation]:
        rows = self.store.rows(
            "SELECT address, quota, expires FROM invitations WHERE expires>=? ORDER BY address",
            (now(),),
        )
        return [Invitation(str(r[0]), int(r[1]), int(r[2])) for r in rows]
