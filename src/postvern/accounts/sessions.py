"""Portal sessions: a server-side store, held in memory by the one process that serves HTTPS
(or, with a Redis backend, shared through Redis: web/portal/shared_sessions.py).

The browser holds only a random 256-bit token in a ``__Host-`` cookie (``Secure; HttpOnly;
SameSite=Strict; Path=/``); the store keys sessions by the token's SHA-256, so nothing in
memory is a usable cookie. A new token is issued at every change of privilege (password
accepted, second factor accepted) so a token planted before login is worth nothing after
it (session fixation, OWASP ASVS V3.2.1). A session that completed login holds the mailbox
key it unlocked — as an open IMAP session does — so the user can create app passwords and
export mail; it is dropped at logout, after ``IDLE_SECONDS`` without a request, or after
``MAX_AGE_SECONDS`` whatever happens. In process memory, a restart logs everyone out,
which is the right failure for a zero-access server (nothing of a session is written down);
in Redis the key is sealed under a key only the cookie gives, and a cluster front holds its
mailbox node's grant instead of the key (cluster/portal.py).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TOKEN_BYTES = 32  # 256 bits: OWASP asks for at least 64 bits of entropy
IDLE_SECONDS = 30 * 60  # OWASP session management: 15-30 minutes for sensitive apps
MAX_AGE_SECONDS = 12 * 3600  # an absolute limit, however active the session
PENDING_SECONDS = 5 * 60  # between the password and the second factor
MAX_SECOND_FACTOR_TRIES = 5  # then the password must be given again
# Sessions kept at most; the oldest anonymous (not logged in) ones go first, so a flood of
# visits to the login page cannot push out real users' sessions.
MAX_SESSIONS = 20_000

ANONYMOUS = "anonymous"  # only a CSRF token for the login forms
PENDING = "second-factor"  # password accepted, second factor still owed
FULL = "full"


@dataclass(eq=False)
class Session:
    key: bytes  # SHA-256 of the cookie token
    csrf: str
    stage: str = ANONYMOUS
    user_id: str | None = None
    address: str | None = None
    mailbox_key: bytes | None = field(default=None, repr=False)
    # On a cluster front: the mailbox node's grant for this session's unlocked mailbox, in
    # place of the key, which only that node holds (cluster/portal.py).
    mailbox_grant: str | None = field(default=None, repr=False)
    method: str = ""
    network: str = ""
    agent: str = ""
    created: float = 0.0
    last_seen: float = 0.0
    tries: int = 0
    authenticated_at: float = 0.0  # the last password, second factor or confirmation
    scratch: dict[str, Any] = field(default_factory=dict)  # WebAuthn challenges, enrolments

    @property
    def logged_in(self) -> bool:
        return self.stage == FULL


def _key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class SessionStore:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def new(self, network: str = "", agent: str = "") -> tuple[str, Session]:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self._clock()
        session = Session(_key(token), secrets.token_urlsafe(TOKEN_BYTES), created=now)
        session.last_seen = now
        session.network, session.agent = network, agent[:200]
        self._sessions[session.key] = session
        self._trim()
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 100:
            return None
        key = _key(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        limit = PENDING_SECONDS if session.stage == PENDING else IDLE_SECONDS
        if now - session.last_seen > limit or now - session.created > MAX_AGE_SECONDS:
            self.drop(session)
            return None
        session.last_seen = now
        self._sessions.move_to_end(key)
        return session

    def rotate(self, session: Session) -> str:
        """A new token for the same session (at each step of login); the old one is dead."""
        self._sessions.pop(session.key, None)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session.key = _key(token)
        session.csrf = secrets.token_urlsafe(TOKEN_BYTES)
        session.created = session.last_seen = self._clock()
        self._sessions[session.key] = session
        return token

    def mark_authenticated(self, session: Session) -> None:
        """The user just proved who they are (logged in, or confirmed with a secret)."""
        session.authenticated_at = self._clock()

    def recently_authenticated(self, session: Session, window: float) -> bool:
        """Whether the user proved who they are less than ``window`` seconds ago."""
        return session.logged_in and self._clock() - session.authenticated_at < window

    def drop(self, session: Session) -> None:
        self._sessions.pop(session.key, None)
        session.mailbox_key = None
        session.mailbox_grant = None
        session.scratch.clear()

    # A store shared between processes (web/portal/shared_sessions.py) fetches a session
    # before the request and writes it back after; in one process there is nothing to do.
    async def load(self, token: str | None) -> None:
        return None

    async def settle(self, session: Session) -> None:
        return None

    async def list_user(self, user_id: str) -> list[Session]:
        return self.of_user(user_id)

    async def end_user(self, user_id: str, *, keep: Session | None = None) -> int:
        return self.drop_user(user_id, keep=keep)

    def of_user(self, user_id: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.user_id == user_id and s.logged_in]

    def drop_user(self, user_id: str, *, keep: Session | None = None) -> int:
        """End every session of the user but ``keep``; returns how many ended."""
        ended = [s for s in self._sessions.values() if s.user_id == user_id and s is not keep]
        for session in ended:
            self.drop(session)
        return len(ended)

    def _trim(self) -> None:
        if len(self._sessions) <= MAX_SESSIONS:
            return
        for key in [k for k, s in self._sessions.items() if s.stage == ANONYMOUS]:
            if len(self._sessions) <= MAX_SESSIONS:
                return
            del self._sessions[key]
        while len(self._sessions) > MAX_SESSIONS:
            _, session = self._sessions.popitem(last=False)
            session.mailbox_key = None

    def __len__(self) -> int:
        return len(self._sessions)
