"""Scoped API tokens: what a script may do in the user's name, and never read mail.

A token is ``pvt_`` and 256 random bits, shown once; the directory keeps only its keyed
hash (HMAC-SHA256 under a server subkey), so a copy of the directory holds no usable token.
Scopes name one resource and one verb each; ``…:write`` implies ``…:read``. No scope gives
access to messages: the API never unlocks a mailbox (a token is not a key slot).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from postvern.accounts.store import AccountStore, now

PREFIX = "pvt_"
TOKEN_BYTES = 32
MAX_TOKENS = 20  # per user; a script per purpose is plenty
MAX_NAME = 64
SCOPES = {
    "account:read": "see the account's settings",
    "aliases:read": "list your aliases",
    "aliases:write": "add and remove your aliases",
    "forwarding:read": "see where your mail is forwarded",
    "forwarding:write": "forward your mail to outside addresses, or stop",
    "app-passwords:read": "list app passwords",
    "app-passwords:write": "revoke app passwords",
    "spam:read": "read the Junk threshold and sender lists",
    "spam:write": "change the Junk threshold and sender lists",
    "admin:read": "list domains and users (administrators only)",
    "admin:write": "add domains and invite, disable or limit users (administrators only)",
}
ADMIN_SCOPES = frozenset({"admin:read", "admin:write"})


class TokenError(ValueError):
    """A token request that cannot be carried out (message says why)."""


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    user_id: str
    name: str
    scopes: frozenset[str]
    created: int
    last_used: int | None

    def allows(self, scope: str) -> bool:
        resource, _, verb = scope.partition(":")
        return scope in self.scopes or (verb == "read" and f"{resource}:write" in self.scopes)


class APITokens:
    def __init__(self, store: AccountStore, key: bytes) -> None:
        self.store = store
        self._key = key

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    def create(self, user_id: str, name: str, scopes: set[str], *, admin: bool) -> str:
        name = name.strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise TokenError(f"a token needs a name of 1 to {MAX_NAME} printable characters")
        unknown = scopes - SCOPES.keys()
        if unknown or not scopes:
            raise TokenError("choose at least one scope from the list")
        if scopes & ADMIN_SCOPES and not admin:
            raise TokenError("only administrators can give a token admin scopes")
        token = PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        with self.store.tx() as c:
            count = c.execute("SELECT count(*) FROM api_tokens WHERE user_id=?", (user_id,))
            if int(count.fetchall()[0][0]) >= MAX_TOKENS:
                raise TokenError(f"at most {MAX_TOKENS} tokens per user")
            if c.execute(
                "SELECT 1 FROM api_tokens WHERE user_id=? AND name=?", (user_id, name)
            ).fetchall():
                raise TokenError(f"a token named {name!r} already exists")
            c.execute(
                "INSERT INTO api_tokens(user_id, name, digest, scopes, created)"
                " VALUES(?, ?, ?, ?, ?)",
                (user_id, name, self._digest(token), " ".join(sorted(scopes)), now()),
            )
        return token

    def authenticate(self, token: str) -> Token | None:
        if not token.startswith(PREFIX) or len(token) > 100:
            return None
        rows = self.store.rows(
            "SELECT id, user_id, name, scopes, created, last_used FROM api_tokens WHERE digest=?",
            (self._digest(token),),
        )
        if not rows:
            return None
        found = _token(rows[0])
        if found.last_used is None or found.last_used < now() - 60:
            self.store.execute("UPDATE api_tokens SET last_used=? WHERE id=?", (now(), found.id))
        return found

    def list(self, user_id: str) -> list[Token]:
        rows = self.store.rows(
            "SELECT id, user_id, name, scopes, created, last_used FROM api_tokens"
            " WHERE user_id=? ORDER BY created, id",
            (user_id,),
        )
        return [_token(r) for r in rows]

    def revoke(self, user_id: str, token_id: int) -> bool:
        return (
            self.store.execute(
                "DELETE FROM api_tokens WHERE user_id=? AND id=?", (user_id, token_id)
            )
            == 1
        )


def _token(row: tuple[object, ...]) -> Token:
    return Token(
        int(row[0]),  # type: ignore[call-overload]
        str(row[1]),
        str(row[2]),
        frozenset(str(row[3]).split()),
        int(row[4]),  # type: ignore[call-overload]
        None if row[5] is None else int(row[5]),  # type: ignore[call-overload]
    )
